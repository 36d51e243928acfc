-- A subtree as `read` returns it and the id of the newest entry of its tree's change feed, read
-- together: the feed's entries after that id are exactly the changes the snapshot does not show.
-- KEYS[1]: the node key of the root. ARGV: prefix, key, depth, limit, root. Returns { last feed id ('0-0': no feed yet), node }.
local fk = feed_key(ARGV[5])
local last = redis.call('XREVRANGE', fk, '+', '-', 'COUNT', 1)[1]
budget = READ_BUDGET
local node = read_node(ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), '')
return { last and last[1] or '0-0', node }
