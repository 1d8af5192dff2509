-- Declared before the acquire, hand-off and fence scripts' bodies, on its own and once per
-- batch.
--
-- `ready_checked`: whether the node's `ready` marker was already seen in this script run
-- (see `acquire.lua`).
local ready_checked = false

-- `mark_high`, `mark_floor`: the node's high-water mark and floor as this script run last
-- read or wrote them, or nil before the first read. Only the fencing scripts below write
-- them within a run, and they keep these in step; the batch script forgets them after any
-- other operation (see `batch.lua`).
local mark_high, mark_floor = nil, nil

-- The fencing state of a node (see docs/fencing.md): per resource a counter that expires
-- after the window, the node's high-water mark `high` (at least every value any counter
-- with a TTL ever had here), and the `floor` (the high-water mark when the node was last
-- seeded). What the node knows of a resource is its counter, raised to the floor, or the
-- high-water mark when the counter is gone. That number never goes down: a counter only
-- expires below `high`, and a counter restored from an older copy of the data is lifted
-- by the floor that the seeding after the restart set.
--
-- KEYS[n+1..2n] are the resources' counters, KEYS[2n+1] the high-water mark and KEYS[2n+2]
-- the floor.
local function fence_known(KEYS, n)
  -- One MGET for the counters, the mark and the floor: each call into Redis costs more
  -- than the Lua around it. A missing key reads as false.
  local got = redis.call('MGET', unpack(KEYS, n + 1, 2 * n + 2))
  local high = tonumber(got[n + 1] or '0')
  local floor = tonumber(got[n + 2] or '0')
  mark_high, mark_floor = high, floor
  local highest = 0
  for i = 1, n do
    local c = got[i]
    local known = high
    if c then
      known = math.max(tonumber(c), floor)
    end
    if known > highest then
      highest = known
    end
  end
  return highest, high
end

-- Sets every counter of KEYS[n+1..2n] to `value` for `window` ms, and raises the
-- high-water mark to it: a counter never outlives a high-water mark below it. Written as
-- integers (`%d`): Redis may turn a Lua number such as 1e9 into text INCRBY and integer
-- replies cannot read.
local function fence_store(KEYS, n, value, high, window)
  local text = string.format('%d', value)
  for i = n + 1, 2 * n do
    redis.call('SET', KEYS[i], text, 'PX', window)
  end
  if value > high then
    redis.call('SET', KEYS[2 * n + 1], text)
    mark_high = value
  end
end

-- The next fencing token for the resources whose counters are KEYS[n+1..2n]: one more than
-- the largest the node knows of them, or than `hint` (the last token this client was
-- given for them, so that a node that missed that acquisition answers as the others do).
-- Every counter is set to it plus the `reserved` tokens after it.
--
-- For one resource, the same number in fewer calls when the hint is right, which is the
-- steady state of a client that locks a resource again: the counter is written with the
-- guess `max(hint, floor) + 1` (plus the reserved tokens) by a `SET ... GET` that returns
-- what it held. What the node knew is at least the floor, so if it is below the guess, the
-- guess is what `max(known, hint) + 1` gives; otherwise the token is one more than it, and
-- the counter is written again, in this same run, before anyone can read it (Redis refuses
-- a script's write for `maxmemory` only before its first one, and a plain `SET` overwrites
-- a key of any type, so that second write cannot fail). The mark
-- and the floor are read once per script run. Several resources take the general way: a
-- `SET ... GET` failing on the second key would leave the first one lowered.
local function next_token(KEYS, n, reserved, window, hint)
  if n > 1 then
    local highest, high = fence_known(KEYS, n)
    local token = math.max(highest, tonumber(hint)) + 1
    fence_store(KEYS, n, token + reserved, high, window)
    return token
  end
  if not mark_high then
    local got = redis.call('MGET', KEYS[3], KEYS[4])
    mark_high, mark_floor = tonumber(got[1] or '0'), tonumber(got[2] or '0')
  end
  local high, floor = mark_high, mark_floor
  local guess = math.max(tonumber(hint), floor) + 1
  local text = string.format('%d', guess + reserved)
  local c = redis.call('SET', KEYS[2], text, 'PX', window, 'GET')
  local known = high
  if c then
    known = math.max(tonumber(c), floor)
  end
  if known < guess then
    if guess + reserved > high then
      redis.call('SET', KEYS[3], text)
      mark_high = guess + reserved
    end
    return guess
  end
  local token = known + 1
  fence_store(KEYS, n, token + reserved, high, window)
  return token
end
