-- Takes a rebuild lease if nobody holds it, and adds it to the index sets
-- of its path so that a prefix invalidation through them finds it.
-- KEYS[1] lease, KEYS[2..] sets; ARGV[1] token, ARGV[2] ttl in ms
local ttl = tonumber(ARGV[2])
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ttl) then
    return 0
end
for i = 2, #KEYS do
    redis.call('SADD', KEYS[i], KEYS[1])
    if redis.call('PTTL', KEYS[i]) < ttl then
        redis.call('PEXPIRE', KEYS[i], ttl)
    end
end
return 1
