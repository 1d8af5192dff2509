-- fencelock: seed
-- Brings a node that came up empty (or restarted with part of its data) back into
-- service: raises its fence counters to the values read from a quorum of seeded nodes,
-- then marks it seeded. Its quarantine still runs out by itself. Idempotent, so several
-- clients may seed one node at once. (A new cluster is opened by `genesis.lua` instead.)
--
-- A seeding is decided from the node states read before it, and its call may reach the
-- node late, after the node restarted again: it applies only while the node's state is the
-- one it was decided from (the same `nonce`), and is refused otherwise.
--
-- KEYS[1]         the node key (`fencelock:node`)
-- KEYS[2..m]      fence counter keys
-- ARGV[1]         the quarantine in milliseconds, should the node not have started one
-- ARGV[2]         the `nonce` of the node state the seeding was decided from
-- ARGV[3..m+1]    the counter values, in the order of KEYS[2..m]
--
-- Returns  1  seeded
--          0  refused: the node's state is not the one the seeding was decided from
if redis.call('HGET', KEYS[1], 'nonce') ~= ARGV[2] then
  return 0
end
for i = 2, #KEYS do
  local v = tonumber(ARGV[i + 1])
  if tonumber(redis.call('GET', KEYS[i]) or '0') < v then
    redis.call('SET', KEYS[i], v)
  end
end
if redis.call('HEXISTS', KEYS[1], 'vote_after') == 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('HSET', KEYS[1], 'vote_after', now + tonumber(ARGV[1]))
end
redis.call('HSET', KEYS[1], 'seeded', 1)
return 1
