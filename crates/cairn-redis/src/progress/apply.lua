-- Applies a batch of updates in order, each atomically with the others (one script call).
-- ARGV: prefix, n, then per update: key, time_ms, nfields, name1, json1, ...; then read_depth,
-- read_limit: when read_depth > 0 the last update's node is returned as `read` returns it.
local n = tonumber(ARGV[2])
local i = 3
local last
for _ = 1, n do
  local k, t, nf = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  i = i + 3
  local nk = nkey(k)
  local v = redis.call('HMGET', nk, '_st', 'progress', 'weight', 'status', '_rt', '_rp', '_rate')
  local created = not v[1]
  local p_old, w_old, s_old = tonumber(v[2]) or 0, tonumber(v[3]) or 1, v[4]
  local p_new, w_new, s_new, lm = p_old, w_old, s_old, false
  local p_set = false
  local out = { '_ut', t }
  if created then out[#out + 1] = '_st'; out[#out + 1] = t end
  for _ = 1, nf do
    local name, value = ARGV[i], ARGV[i + 1]
    i = i + 2
    out[#out + 1] = name; out[#out + 1] = value
    if name == 'progress' then p_new = tonumber(value); p_set = true
    elseif name == 'weight' then w_new = tonumber(value)
    elseif name == 'status' then s_new = value
    elseif name == 'msg' then lm = value
    end
  end
  if lm then out[#out + 1] = '_lm'; out[#out + 1] = lm end
  local clear = false
  if p_set or s_new ~= s_old then
    clear = eta_fields(out, t, p_new, s_new, v[5], v[6], v[7])
  end
  redis.call('HSET', nk, unpack(out))
  if clear then clear_eta(k) end
  local root
  if created then
    root = propagate(k, true, false, t, w_new, w_new * p_new, false, s_new, lm, t)
  else
    root = propagate(k, false, false, t, w_new - w_old, w_new * p_new - w_old * p_old, s_old, s_new, lm, t)
  end
  redis.call('ZADD', P .. ':proots', t, root)
  last = k
end
local depth = tonumber(ARGV[i])
if depth and depth > 0 and last then
  return read_node(last, depth, tonumber(ARGV[i + 1]), '')
end
return n
