-- ARGV: prefix, stream, group, id, idempotency_key ('' none), fingerprint, idempotency_ttl_ms,
--       registry key, progress key ('' writes no progress node), its time_ms and nfields, then
--       nfields progress name/JSON pairs, then the record's field/value pairs.
-- One atomic step: the record exists, its progress node holds the fields given (applied as the
-- progress store applies any update) and the entry is in the stream, or none of these happened.
-- An idempotent repeat or conflict writes nothing. Returns {outcome, id, entry_id}.
local id, idem, fp, ttl, registry = ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[8]
if idem ~= '' then
  local existing = redis.call('GET', P .. KEY_IDEM .. idem)
  if existing then
    local known = redis.call('HGET', rkey(existing), 'fingerprint')
    if known == fp then return { 'existing', existing, '' } end
    if known then return { 'conflict', existing, '' } end
    -- the record is gone (purged): the key is free again
  end
end
local progress_key, nf = ARGV[9], tonumber(ARGV[11])
local fields = {}
for i = 12 + 2 * nf, #ARGV do fields[#fields + 1] = ARGV[i] end
if progress_key ~= '' then
  apply_update(progress_key, time_of(ARGV[10]), ARGV, 12, nf)
  flush()
end
local entry = redis.call('XADD', STREAM, '*', 'id', id)
fields[#fields + 1] = 'entry_id'
fields[#fields + 1] = entry
redis.call('HSET', rkey(id), unpack(fields))
if idem ~= '' then redis.call('SET', P .. KEY_IDEM .. idem, id, 'PX', ttl) end
redis.call('SADD', registry, STREAM)
return { 'created', id, entry }
