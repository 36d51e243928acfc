-- ARGV: prefix, stream, group, id, idempotency_key ('' none), fingerprint, idempotency_ttl_ms,
--       registry key, then record field/value pairs. One atomic step: the record exists and the
--       entry is in the stream, or neither. Returns {outcome, id, entry_id}.
local id, idem, fp, ttl, registry = ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[8]
if idem ~= '' then
  local existing = redis.call('GET', P .. ':idem:' .. idem)
  if existing then
    local known = redis.call('HGET', rkey(existing), 'fingerprint')
    if known == fp then return { 'existing', existing, '' } end
    if known then return { 'conflict', existing, '' } end
    -- the record is gone (purged): the key is free again
  end
end
local fields = {}
for i = 9, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', rkey(id), unpack(fields))
local entry = redis.call('XADD', STREAM, '*', 'id', id)
redis.call('HSET', rkey(id), 'entry_id', entry)
if idem ~= '' then redis.call('SET', P .. ':idem:' .. idem, id, 'PX', ttl) end
redis.call('SADD', registry, STREAM)
return { 'created', id, entry }
