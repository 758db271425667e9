-- include: lib_time
-- include: breaker_lib
-- adaptive_take: one call per batch of adaptive checks. Records the breaker outcomes of earlier checks,
-- puts back sections whose check failed or was skipped, reserves evenly spaced scrape slots from the
-- shared pace (a GCRA: one slot every spacing_ms across all daemons, never a burst), asks the breaker to
-- admit them, and takes the most valuable due sections into them. Taking a section is its lease: its due
-- time moves to slot + interval + late_ms at once, so a crash leaves it due again one interval later and no
-- acknowledgement is needed (a re-check of a committed section finds no change and claims nothing).
-- Because the next due time counts from the slot, two checks of one section, by any daemons, are never
-- closer than its interval (>= the minimum) as long as each reaches the scraper within late_ms of its slot.
--
-- KEYS[1] due (zset member -> due ms)   KEYS[2] interval (hash member -> ms)   KEYS[3] prio (hash)
-- KEYS[4] last (hash member -> slot ms of the last take; negative: -added ms, never checked)
-- KEYS[5] pace (hash: tat)   KEYS[6] scrapes (hash minute -> scrapes)   KEYS[7] breaker   KEYS[8] trials
-- ARGV[1] JSON {cfg, outcomes = [[kind, trial]], retry = [[member, delay_ms]], release = [[member, prev]],
--               want, horizon_ms, spacing_ms, late_ms, max_ms}
-- Reply: JSON {now_ms, taken = [[member, slot_ms, prev_last_ms, trial]], next_due_ms (-1: none),
--              retry_after_ms, tat_ms (the pace's next free slot), breaker = view}
local now = now_ms()
local a = cjson.decode(ARGV[1])
local cfg = a.cfg
local b
if #a.outcomes > 0 then
    b = breaker_record(KEYS[7], KEYS[8], a.outcomes, cfg, now)
end
for _, r in ipairs(a.retry) do
    local due = redis.call('ZSCORE', KEYS[1], r[1])
    if due and tonumber(due) > now + r[2] then
        redis.call('ZADD', KEYS[1], now + r[2], r[1])
    end
end
for _, r in ipairs(a.release) do
    -- A reservation this daemon could not start in time: due now, and its last check is the one before.
    if redis.call('ZSCORE', KEYS[1], r[1]) then
        redis.call('ZADD', KEYS[1], now, r[1])
        redis.call('HSET', KEYS[4], r[1], r[2])
    end
end

local taken, trials, retry_ms = {}, {}, 0
local horizon_end = now + a.horizon_ms
local tat = tonumber(redis.call('HGET', KEYS[5], 'tat') or '0') or 0
if tat < now then tat = now end
local want = math.min(a.want, math.floor((horizon_end - tat) / a.spacing_ms) + 1)
if want > 0 then
    -- Candidates: due by the end of the horizon, earliest first; among those due now, priority first.
    local raw = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', horizon_end, 'WITHSCORES', 'LIMIT', 0, want * 4)
    local cands = {}
    for i = 1, #raw, 2 do
        cands[#cands + 1] = {m = raw[i], due = tonumber(raw[i + 1])}
    end
    if #cands > 0 then
        local ms = {}
        for i, c in ipairs(cands) do ms[i] = c.m end
        local prios = redis.call('HMGET', KEYS[3], unpack(ms))
        for i, c in ipairs(cands) do c.prio = tonumber(prios[i]) or 0 end
        table.sort(cands, function(x, y)
            local xn, yn = x.due <= now, y.due <= now
            if xn ~= yn then return xn end
            if xn and x.prio ~= y.prio then return x.prio > y.prio end
            if x.due ~= y.due then return x.due < y.due end
            return x.m < y.m
        end)
        local n = math.min(want, #cands)
        local admitted
        admitted, trials, retry_ms, b = breaker_allow(KEYS[7], KEYS[8], n, cfg, now)
        local minute_counts = {}
        for i = 1, admitted do
            local c = cands[i]
            local slot = math.max(tat, c.due)
            if slot > horizon_end then
                -- Not this batch after all: free the trial slot it would have used.
                if trials[i] then redis.call('ZREM', KEYS[8], trials[i]) end
            else
                tat = slot + a.spacing_ms
                local interval = tonumber(redis.call('HGET', KEYS[2], c.m) or a.max_ms) or a.max_ms
                local prev = tonumber(redis.call('HGET', KEYS[4], c.m) or '0') or 0
                redis.call('HSET', KEYS[4], c.m, slot)
                redis.call('ZADD', KEYS[1], slot + interval + a.late_ms, c.m)
                taken[#taken + 1] = {c.m, slot, prev, trials[i] or ''}
                local minute = tostring(math.floor(slot / 60000))
                minute_counts[minute] = (minute_counts[minute] or 0) + 1
            end
        end
        for minute, count in pairs(minute_counts) do
            redis.call('HINCRBY', KEYS[6], minute, count)
        end
        redis.call('HSET', KEYS[5], 'tat', tat)
    end
end
if b == nil then
    b = breaker_load(KEYS[7])
    breaker_settle_time(b, cfg, now)
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local next_due = -1
if first[2] then next_due = tonumber(first[2]) end
local reply = {now_ms = now, taken = taken, next_due_ms = next_due, retry_after_ms = retry_ms, tat_ms = tat,
               breaker = breaker_view(KEYS[8], b, cfg, now)}
return cjson.encode(reply)
