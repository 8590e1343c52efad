-- Stores a rebuilt entry: only while the rebuild still holds its lease
-- (when fenced), then releases the lease, adds the key to its sets (tags,
-- prefix indexes) and appends it to the fill feed, all at once.
-- KEYS[1] entry, KEYS[2] lease, KEYS[3] fill feed (a stream), KEYS[4..] sets
-- ARGV[1] lease token ("" = unfenced), ARGV[2] record, ARGV[3] ttl in ms,
-- ARGV[4] feed length cap
local ttl = tonumber(ARGV[3])
if ARGV[1] ~= '' then
    if redis.call('GET', KEYS[2]) ~= ARGV[1] then
        return 0
    end
    redis.call('DEL', KEYS[2])
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
for i = 4, #KEYS do
    -- Sets live as long as their newest member, so a busy prefix's set is
    -- renewed forever: drop up to two members whose keys are gone (expired
    -- or invalidated through another set) on each fill, which keeps dead
    -- members from piling up.
    for _, member in ipairs(redis.call('SRANDMEMBER', KEYS[i], 2)) do
        if member ~= KEYS[1] and redis.call('EXISTS', member) == 0 then
            redis.call('SREM', KEYS[i], member)
        end
    end
    redis.call('SADD', KEYS[i], KEYS[1])
    if redis.call('PTTL', KEYS[i]) < ttl then
        redis.call('PEXPIRE', KEYS[i], ttl)
    end
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'k', KEYS[1])
return 1
