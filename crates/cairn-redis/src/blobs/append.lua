-- ARGV: prefix, base key, expected offset, expire-at (ms; 0: none), then the chunk's bytes.
-- Appends one chunk to the blob at `base` if it has exactly `expected` bytes now, so two
-- writers racing at one offset never interleave: the second is told the real offset. A blob
-- with a declared `length` never grows past it.
-- Returns {'ok', new offset} | {'offset', offset} | {'length', offset} | {'missing', 0}.
local base, expected, expire_at, data = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local m = redis.call('HMGET', base, 'offset', 'length')
if not m[1] then return { 'missing', 0 } end
local offset = tonumber(m[1])
if offset ~= expected then return { 'offset', offset } end
local length = tonumber(m[2])
if length and offset + #data > length then return { 'length', offset } end
redis.call('HINCRBY', base, 'received', #data)
local seq = redis.call('HINCRBY', base, 'seq', 1)
redis.call('HSET', base .. ':c', seq, data)
redis.call('RPUSH', base .. ':i', seq)
redis.call('HSET', base, 'offset', offset + #data)
if expire_at > 0 then
  redis.call('PEXPIREAT', base, expire_at)
  redis.call('PEXPIREAT', base .. ':c', expire_at)
  redis.call('PEXPIREAT', base .. ':i', expire_at)
end
return { 'ok', offset + #data }
