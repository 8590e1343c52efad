-- Soft purge of one key: a lease is deleted; an entry record of this codec
-- version written for this key is marked stale from ARGV[1] on, in place
-- (SETRANGE keeps the record's TTL): fresh-until lowered to ARGV[1], and
-- the grace and stale-if-error ends moved as much earlier, so each window
-- starts then (`entry::mark_stale_record` does the same; times from 2^53
-- on, beyond what a Lua number holds exactly, stay). An entry stale by
-- then, or anything else (a vary stub, another version or type) is left.
-- KEYS[1] the key; ARGV[1] ms since the epoch; ARGV[2] the record head
-- (magic and version, `entry::ENTRY_HEAD`).
-- Entry layout (src/entry.rs): head (3) | key length (u32 BE) | key |
-- status (2) | stored_at | fresh_until | stale_until | error_until (u64 BE)
if string.sub(KEYS[1], -6) == ':lease' then
    return redis.call('DEL', KEYS[1])
end
if redis.call('TYPE', KEYS[1]).ok ~= 'string' then
    return 0
end
local head = redis.call('GETRANGE', KEYS[1], 0, 6)
if #head < 7 or string.sub(head, 1, 3) ~= ARGV[2] then
    return 0
end
local b1, b2, b3, b4 = string.byte(head, 4, 7)
if ((b1 * 256 + b2) * 256 + b3) * 256 + b4 ~= #KEYS[1] then
    return 0
end
if redis.call('GETRANGE', KEYS[1], 7, 6 + #KEYS[1]) ~= KEYS[1] then
    return 0
end
local at = 7 + #KEYS[1] + 2 + 8
local fields = redis.call('GETRANGE', KEYS[1], at, at + 23)
if #fields < 24 then
    return 0
end
local function read(from)
    local value = 0
    for i = from, from + 7 do
        value = value * 256 + string.byte(fields, i)
    end
    return value
end
local function bytes(value)
    local out = {}
    for i = 8, 1, -1 do
        out[i] = value % 256
        value = math.floor(value / 256)
    end
    return string.char(unpack(out))
end
local limit = 2 ^ 53
local now = tonumber(ARGV[1])
local fresh, stale, err = read(1), read(9), read(17)
if fresh <= now then
    return 0
end
local out = bytes(now)
for _, until_ms in ipairs({stale, err}) do
    if fresh >= limit or until_ms >= limit then
        -- Unchanged: write back the bytes as they were.
        out = out .. string.sub(fields, #out + 1, #out + 8)
    else
        out = out .. bytes(until_ms - (fresh - now))
    end
end
redis.call('SETRANGE', KEYS[1], at, out)
return 1
