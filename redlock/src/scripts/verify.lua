-- fencelock: verify
-- Run by every client on every new connection to a node, before anything else on it:
-- finds a node that restarted with part of its data (an RDB snapshot, an AOF that lost
-- its last second, a restored backup). Such a node may miss lock keys and fence counters
-- it had acknowledged, which is as dangerous as an empty node, but it still has its
-- `ready` marker and would vote at once. The node state remembers the server's `run_id`
-- (new on every start) under which it was last verified; a different one means a
-- restart, and the node is put back into quarantine, unseeded, exactly like an empty one.
-- A node whose persistence cannot lose an acknowledged write (AOF with `appendfsync
-- always`) is trusted across restarts.
--
-- KEYS[1]         the node key (`fencelock:node`); `ready` marker: that name plus `:ready`
-- ARGV[1]         the server's `run_id`, read on this connection
-- ARGV[2]         1 when the node's persistence cannot lose an acknowledged write, else 0
-- ARGV[3]         the quarantine in milliseconds
-- ARGV[4]         a fresh random nonce, naming the node state a reset starts
--
-- Returns  1  the node is as it was (or empty, or trusted): nothing changed
--          2  the node restarted with data it may not fully have: quarantined, unseeded
local node = KEYS[1]
if redis.call('HGET', node, 'boot') == ARGV[1] then
  return 1
end
if redis.call('EXISTS', node) == 0 or ARGV[2] == '1' then
  -- Empty: the acquire script quarantines it on first contact. Durable: nothing was lost.
  redis.call('HSET', node, 'boot', ARGV[1])
  return 1
end
redis.call('DEL', node .. ':ready')
redis.call('HDEL', node, 'genesis')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', node, 'vote_after', now + tonumber(ARGV[3]), 'seeded', 0, 'nonce', ARGV[4], 'boot', ARGV[1])
return 2
