-- Declared before the acquire and hand-off scripts' bodies, on its own and once per batch.
--
-- `ready_checked`: whether the node's `ready` marker was already seen in this script run
-- (see `acquire.lua`).
local ready_checked = false

-- The next fencing token for the resources whose counters are KEYS[n+1..2n]: one more than
-- the largest of them. Every counter is set to it plus the `reserved` tokens after it.
local function next_token(KEYS, n, reserved)
  local highest = 0
  for i = n + 1, 2 * n do
    local f = tonumber(redis.call('GET', KEYS[i]) or '0')
    if f > highest then
      highest = f
    end
  end
  local token = highest + 1
  for i = n + 1, 2 * n do
    redis.call('SET', KEYS[i], token + reserved)
  end
  return token
end
