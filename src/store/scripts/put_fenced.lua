-- Stores a rebuilt entry only while the rebuild still holds its lease, then
-- releases the lease and appends the key to the fill feed, all at once.
-- KEYS[1] entry, KEYS[2] lease, KEYS[3] fill feed (a stream)
-- ARGV[1] lease token, ARGV[2] record, ARGV[3] ttl in ms, ARGV[4] feed length cap
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
    return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('DEL', KEYS[2])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'k', KEYS[1])
return 1
