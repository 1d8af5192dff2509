-- fencelock: acquire
-- Sets every key to the lock value with a TTL, all of them or none of them. A key that
-- exists (held by anyone, including a node-redlock or redsync client) refuses the whole
-- acquisition on this node, so a multi-resource lock is atomic per node.
--
-- Restart awareness: a node votes only once it is seeded (its fence counters copied from
-- the others, or the cluster is new) and its quarantine has passed. The node key records
-- both; a restart without persistence loses it, so the node finds out by itself and every
-- client agrees without talking to the others. A restart that kept part of the data is
-- found by `verify.lua`, which every client runs on every new connection first, and which
-- puts the node back into this state.
--
-- With fencing, the acquisition's token is one more than the largest number the node knows
-- of its resources (see `fence_known` in the prelude), and every counter is set to it plus
-- the tokens reserved with it, for the fence window: the client may hand those to the next
-- holders in its process without a round, and every later acquisition's token is larger
-- than all of them.
--
-- KEYS[1..n]      the resource keys (the resource names as given: the interop convention)
-- KEYS[n+1..2n]   with fencing only: the resources' fence counter keys
-- KEYS[2n+1]      with fencing only: the node's high-water mark (`fencelock:fence:high`)
-- KEYS[2n+2]      with fencing only: the node's floor (`fencelock:fence:floor`)
-- KEYS[#KEYS]     the node key (`fencelock:node`); its `ready` marker is that name with
--                 `:ready` appended
-- ARGV[1]         the lock value: 128 random bits, unique to this acquisition
-- ARGV[2]         the TTL in milliseconds
-- ARGV[3]         the quarantine in milliseconds, for a node seen empty for the first time
-- ARGV[4]         1 with fencing, 0 without
-- ARGV[5]         with fencing: how many tokens after this one to reserve (0 for none)
-- ARGV[6]         with fencing: the fence window, how long a counter lives, in milliseconds
-- ARGV[7]         with fencing: the last token this client was given for these resources,
--                 or 0: the token is larger than it
--
-- Returns  >= 1  granted: the fencing token with fencing (the first of the reserved
--                run), else 1
--             0  some key exists: nothing set
--            -1  this node is in quarantine after a restart: nothing set
--            -2  this node has not been seeded since it came up empty: nothing set
local node = KEYS[#KEYS]
local fenced = ARGV[4] == '1'
local n = #KEYS - 1
if fenced then
  n = (n - 2) / 2
end

-- The common case first: a node that may vote has a `ready` marker beside its state, so
-- one EXISTS decides. A restart without data loses both. `ready_checked` (declared before
-- this script's body) remembers a positive check for the rest of a batch: nothing in one
-- script run can remove the marker.
local ready = node .. ':ready'
if not ready_checked and redis.call('EXISTS', ready) == 0 then
  local state = redis.call('HMGET', node, 'vote_after', 'seeded')
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if not state[1] then
    -- This acquisition's value is unique, so it also names this life of the node's state:
    -- a seeding decided from another life is refused (see `seed.lua`).
    redis.call('HSET', node, 'vote_after', now + tonumber(ARGV[3]), 'seeded', 0, 'nonce', ARGV[1])
    return -2
  end
  if state[2] ~= '1' then
    return -2
  end
  if now < tonumber(state[1]) then
    return -1
  end
  redis.call('SET', ready, 1)
end
ready_checked = true

if n == 1 then
  -- One key: SET NX is the check and the write in one command.
  if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return 0
  end
else
  for i = 1, n do
    if redis.call('EXISTS', KEYS[i]) == 1 then
      return 0
    end
  end
  for i = 1, n do
    redis.call('SET', KEYS[i], ARGV[1], 'PX', ARGV[2])
  end
end
local token = 1
if fenced then
  token = next_token(KEYS, n, tonumber(ARGV[5]), ARGV[6], ARGV[7])
end
return token
