-- fencelock: genesis
-- Initialises a new cluster without a quarantine, in two steps, so that a decision made
-- from stale reads can never open a node that restarted after the cluster was in use. A
-- client that read a quorum of nodes unseeded and none seeded first claims each of them
-- for its decision; only a decision that claimed a quorum opens the nodes it claimed. A
-- node seeded, or claimed by another decision, since it was read refuses the claim, and
-- two decisions cannot both claim a quorum.
--
-- KEYS[1]   the node key (`fencelock:node`); `ready` marker: that name plus `:ready`
-- ARGV[1]   `claim` or `open`
-- ARGV[2]   the `nonce` of the node state the decision was made from
-- ARGV[3]   the decision's id: random, unique to it
--
-- Returns  1  claimed, or opened: seeded, out of quarantine, votes from now on
--          0  refused: the node's state is not the one read, or it is seeded, or another
--             decision claimed it (claim); or this decision did not claim it (open)
local node = KEYS[1]
local state = redis.call('HMGET', node, 'nonce', 'seeded', 'genesis')
if state[1] ~= ARGV[2] then
  return 0
end
if ARGV[1] == 'claim' then
  if state[2] == '1' or state[3] then
    return 0
  end
  redis.call('HSET', node, 'genesis', ARGV[3])
  return 1
end
if state[3] ~= ARGV[3] then
  return 0
end
redis.call('HSET', node, 'vote_after', 0, 'seeded', 1)
redis.call('SET', node .. ':ready', 1)
return 1
