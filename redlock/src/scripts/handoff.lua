-- fencelock: hand-off
-- Passes a lock from one holder in a process to the next without letting go of it: swaps
-- our previous value for a fresh one and resets the TTL, all keys or none. One round
-- instead of a release followed by an acquire. With fencing it also issues the next token,
-- exactly as acquire does. (A node whose keys still hold our value has not lost its data,
-- so no restart check is needed here.)
--
-- KEYS[1..n]      the resource keys
-- KEYS[n+1..2n]   with fencing only: the resources' fence counter keys
-- KEYS[2n+1]      with fencing only: the node's high-water mark
-- KEYS[2n+2]      with fencing only: the node's floor
-- ARGV[1]         the value of this acquisition: 128 random bits, unique to it
-- ARGV[2]         the TTL in milliseconds
-- ARGV[3]         1 with fencing, 0 without
-- ARGV[4]         with fencing: how many tokens after this one to reserve, as in acquire
-- ARGV[5]         with fencing: the fence window in milliseconds, as in acquire (else 0)
-- ARGV[6]         with fencing: the last token this client was given for these resources,
--                 as in acquire (else 0)
-- ARGV[7..m]      the values of the hand-off chain so far, all held by this process (a node
--                 that missed a hand-off still holds an earlier one)
--
-- Returns  >= 1  every key held a value of the chain and now holds the new one: the
--                fencing token with fencing, else 1
--             0  otherwise (nothing changed)
local fenced = ARGV[3] == '1'
local n = #KEYS
if fenced then
  n = (n - 2) / 2
end
for i = 1, n do
  local current = redis.call('GET', KEYS[i])
  local ours = false
  for j = 7, #ARGV do
    if current == ARGV[j] then
      ours = true
      break
    end
  end
  if not ours then
    return 0
  end
end
local token = 1
if fenced then
  token = next_token(KEYS, n, tonumber(ARGV[4]), ARGV[5], ARGV[6])
end
for i = 1, n do
  redis.call('SET', KEYS[i], ARGV[1], 'PX', ARGV[2])
end
return token
