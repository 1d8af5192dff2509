-- fencelock: init
-- Gives a node that has no restart state one, in quarantine and unseeded, as the acquire
-- script would on first contact: a seeding can only be decided from a state with a
-- `nonce`. A state without one (made by an older client) gets one, and is otherwise left
-- as it is.
--
-- KEYS[1]         the node key (`fencelock:node`)
-- ARGV[1]         a fresh random nonce, naming this life of the node's state
-- ARGV[2]         the quarantine in milliseconds
--
-- Returns  1  a state was created, or given a nonce
--          0  the node already had a state with a nonce
if redis.call('HEXISTS', KEYS[1], 'vote_after') == 1 then
  if redis.call('HEXISTS', KEYS[1], 'nonce') == 1 then
    return 0
  end
  redis.call('HSET', KEYS[1], 'nonce', ARGV[1])
  return 1
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'vote_after', now + tonumber(ARGV[2]), 'seeded', 0, 'nonce', ARGV[1])
return 1
