-- ARGV: prefix, base key, expected offset, expire-at (ms; 0: none), then staged chunk numbers.
-- Appends the staged chunks, in order, if the blob still has exactly `expected` bytes and
-- stays within its declared `length`; otherwise changes nothing (the caller drops them).
-- Returns {'ok', new offset} | {'offset', offset} | {'length', offset} | {'missing', 0}.
local base, expected, expire_at = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local m = redis.call('HMGET', base, 'offset', 'length')
if not m[1] then return { 'missing', 0 } end
local offset = tonumber(m[1])
if offset ~= expected then return { 'offset', offset } end
local added = 0
for i = 5, #ARGV do
  local n = redis.call('HSTRLEN', base .. ':c', ARGV[i])
  added = added + n
end
local length = tonumber(m[2])
if length and offset + added > length then return { 'length', offset } end
for i = 5, #ARGV do redis.call('RPUSH', base .. ':i', ARGV[i]) end
redis.call('HSET', base, 'offset', offset + added)
if expire_at > 0 then
  redis.call('PEXPIREAT', base, expire_at)
  if redis.call('EXISTS', base .. ':c') == 1 then redis.call('PEXPIREAT', base .. ':c', expire_at) end
  if redis.call('EXISTS', base .. ':i') == 1 then redis.call('PEXPIREAT', base .. ':i', expire_at) end
end
return { 'ok', offset + added }
