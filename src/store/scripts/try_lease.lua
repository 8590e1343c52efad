-- Takes a rebuild lease if nobody holds it, and adds it to its sets (the
-- index sets of its path, the in-flight set) so that an invalidation
-- through them finds it.
-- KEYS[1] lease, KEYS[2..] sets; ARGV[1] token, ARGV[2] ttl in ms
local ttl = tonumber(ARGV[2])
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ttl) then
    return 0
end
for i = 2, #KEYS do
    -- As in fill.lua: drop up to two members whose keys are gone (a set
    -- renewed by every lease, such as the in-flight set, would otherwise
    -- keep every lease it ever had).
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
return 1
