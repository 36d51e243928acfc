-- ARGV: prefix, stream, group, id, idempotency_key ('' none), fingerprint, idempotency_ttl_ms,
--       registry key, progress key ('' writes no progress node), its time_ms and nfields, then
--       nfields progress name/JSON pairs, then nstreams and nstreams name/source pairs (source:
--       the base key of a finished upload to take, or '' for a stream already stored at the
--       request's own key), then the record's field/value pairs.
-- KEYS[1]: the partition's stream. With TAGGED (a cluster) the caller passes no progress key and
-- applies the update itself after a 'created', and the stream is registered with its group.
-- One atomic step: the record exists, its progress node holds the fields given (applied as the
-- progress store applies any update), its streams are the request's (uploads renamed to
-- P:req:<id>:s:<name>, no expiry) and the entry is in the stream, or none of these happened.
-- An upload another submission has claimed (blobs/claim.lua) is as good as gone.
-- An idempotent repeat or conflict writes nothing, and is answered before any upload is looked
-- at: a repeat whose uploads were used by the first submission still finds that one.
-- Returns {outcome, id, entry_id} (for a stream problem: {'stream_missing' | 'stream_incomplete',
-- stream name, detail}).
local id, idem, fp, ttl, registry = ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[8]
if idem ~= '' then
  local existing = redis.call('GET', P .. KEY_IDEM .. PT .. idem)
  if existing then
    local known = redis.call('HGET', rkey(existing), 'fingerprint')
    if known == fp then return answer({ 'existing', existing, '' }) end
    if known then return answer({ 'conflict', existing, '' }) end
    -- the record is gone (purged): the key is free again
  end
end
local progress_key, nf = ARGV[9], tonumber(ARGV[11])
local s0 = 12 + 2 * nf
local ns = tonumber(ARGV[s0])
local claimant = upload_claimant(id, idem)
for i = 0, ns - 1 do
  local name, source = ARGV[s0 + 1 + 2 * i], ARGV[s0 + 2 + 2 * i]
  if source ~= '' then
    local m = redis.call('HMGET', source, 'offset', 'length', 'claimed_by', 'claimed_until')
    if not m[1] then return answer({ 'stream_missing', name, '' }) end
    -- another submission is copying it into its request (blobs/claim.lua): it is that one's
    if m[3] and m[3] ~= claimant and (tonumber(m[4]) or 0) > redis_now_ms() then
      return answer({ 'stream_missing', name, '' })
    end
    if m[1] ~= m[2] then return answer({ 'stream_incomplete', name, m[1] .. '/' .. (m[2] or '?') }) end
  end
end
local fields = {}
for i = s0 + 1 + 2 * ns, #ARGV do fields[#fields + 1] = ARGV[i] end
if progress_key ~= '' then
  apply_update(progress_key, time_of(ARGV[10]), ARGV, 12, nf)
  flush()
end
for i = 0, ns - 1 do
  local name, source = ARGV[s0 + 1 + 2 * i], ARGV[s0 + 2 + 2 * i]
  local target = rkey(id) .. ':s:' .. name
  if source ~= '' then
    redis.call('RENAME', source, target)
    for _, suffix in ipairs({ ':c', ':i' }) do
      if redis.call('EXISTS', source .. suffix) == 1 then
        redis.call('RENAME', source .. suffix, target .. suffix)
      end
    end
  end
  for _, suffix in ipairs({ '', ':c', ':i' }) do redis.call('PERSIST', target .. suffix) end
end
-- The stream entry carries the trace context too, so whoever reads the queue can join the trace.
local entry_fields = { 'id', id }
for i = 1, #fields - 1, 2 do
  if fields[i] == 'traceparent' and fields[i + 1] ~= '' then
    entry_fields[3], entry_fields[4] = 'traceparent', fields[i + 1]
  end
end
local entry = redis.call('XADD', STREAM, '*', unpack(entry_fields))
fields[#fields + 1] = 'entry_id'
fields[#fields + 1] = entry
redis.call('HSET', rkey(id), unpack(fields))
if idem ~= '' then redis.call('SET', P .. KEY_IDEM .. PT .. idem, id, 'PX', ttl) end
if not TAGGED then redis.call('SADD', registry, STREAM) end
return answer({ 'created', id, entry })
