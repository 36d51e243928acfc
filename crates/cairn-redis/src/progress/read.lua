-- Reads a node and its children to a depth; children sorted by start_time and paginated.
-- A node reads as { key, hgetall, child_count, page, more, tasks } (tasks: nodes of the page when
-- depth > 1). At most READ_BUDGET nodes are read in one call; past it, deeper `tasks` are left out.
local READ_BUDGET = 20000
local budget = READ_BUDGET
local read_node

read_node = function(k, depth, limit, after)
  local h = redis.call('HGETALL', nkey(k))
  if #h == 0 then return false end
  budget = budget - 1
  local ck = ckey(k)
  local count = redis.call('ZCARD', ck)
  local page, more, tasks = {}, 0, {}
  if count > 0 then
    local start = 0
    if after ~= '' then
      local rank = redis.call('ZRANK', ck, after)
      -- A message after the code keeps the code: a bare error_reply('CODE') reaches the client as
      -- 'ERR CODE'.
      if not rank then return redis.error_reply('CAIRN_BAD_CURSOR after is not a child of this node') end
      start = rank + 1
    end
    page = redis.call('ZRANGE', ck, start, start + limit - 1)
    if start + #page < count then more = 1 end
    if depth > 1 then
      for j, child in ipairs(page) do
        if budget <= 0 then break end
        local node = read_node(child, depth - 1, limit, '')
        if type(node) == 'table' and node.err then return node end
        tasks[j] = node
      end
    end
  end
  return { k, h, count, page, more, tasks }
end
