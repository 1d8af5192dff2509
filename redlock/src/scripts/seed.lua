-- fencelock: seed
-- Brings a node that came up empty (or restarted with part of its data) back into
-- service: raises its high-water mark to the largest fencing number read from a quorum of
-- seeded nodes, sets its floor to the high-water mark (a counter it kept from an older
-- copy of its data counts for no less than that), then marks it seeded. Its quarantine
-- still runs out by itself. Idempotent, so several clients may seed one node at once. (A
-- new cluster is opened by `genesis.lua` instead.)
--
-- A seeding is decided from the node states read before it, and its call may reach the
-- node late, after the node restarted again: it applies only while the node's state is the
-- one it was decided from (the same `nonce`), and is refused otherwise.
--
-- KEYS[1]         the node key (`fencelock:node`)
-- KEYS[2]         the node's high-water mark (`fencelock:fence:high`)
-- KEYS[3]         the node's floor (`fencelock:fence:floor`)
-- ARGV[1]         the quarantine in milliseconds, should the node not have started one
-- ARGV[2]         the `nonce` of the node state the seeding was decided from
-- ARGV[3]         the largest fencing number read (high-water marks and counters alike)
--
-- Returns  1  seeded
--          0  refused: the node's state is not the one the seeding was decided from
if redis.call('HGET', KEYS[1], 'nonce') ~= ARGV[2] then
  return 0
end
local high = math.max(tonumber(redis.call('GET', KEYS[2]) or '0'), tonumber(ARGV[3]))
-- As integers: see `fence_store` in the prelude.
redis.call('SET', KEYS[2], string.format('%d', high))
if tonumber(redis.call('GET', KEYS[3]) or '0') < high then
  redis.call('SET', KEYS[3], string.format('%d', high))
end
if redis.call('HEXISTS', KEYS[1], 'vote_after') == 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('HSET', KEYS[1], 'vote_after', now + tonumber(ARGV[1]))
end
redis.call('HSET', KEYS[1], 'seeded', 1)
return 1
