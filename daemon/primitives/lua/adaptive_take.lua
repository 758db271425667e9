-- include: lib_time
-- include: breaker_lib
-- adaptive_take: one call per batch of adaptive checks (many dozens of them). The sections themselves were
-- leased in Postgres (seatwatch_adaptive_lease); Redis only keeps what every daemon must share atomically.
-- Records the breaker outcomes of earlier checks, asks the breaker to admit the batch, and reserves one
-- evenly spaced scrape slot per admitted section from the shared pace (a GCRA: one slot every spacing_ms
-- across all daemons, never a burst; a section's slot is never before its due time, so two checks of one
-- section stay its interval apart). Nothing here is per section: TIME once, the pace read and written once,
-- the breaker loaded once (and saved once when outcomes came along), whatever the batch's size: six billed
-- commands in all, the call included, in the steady state.
--
-- KEYS[1] pace (string: the next free slot, ms)   KEYS[2] breaker hash   KEYS[3] breaker trials
-- ARGV[1] JSON {cfg, outcomes = [[kind, trial]], dues = [due_ms, ...] (the leased sections, best first),
--               horizon_ms (from the pace's next free slot), spacing_ms}
-- Reply: JSON (daemon.adaptive.taker.TakeReply) {now_ms, slots = [slot_ms or -1 (not this batch)],
--        trials = [trial id or ''], retry_after_ms, tat_ms, breaker = {state, failures, retry_after_ms}}
local now = now_ms()
local a = cjson.decode(ARGV[1])
local cfg = a.cfg
local b
if #a.outcomes > 0 then
    b = breaker_record(KEYS[2], KEYS[3], a.outcomes, cfg, now)
end
local slots, trial_ids, retry_ms = {}, {}, 0
local tat = now
local n = #a.dues
if n > 0 then
    -- Just recorded and CLOSED: breaker_allow would load it again only to admit all n (closed admits all).
    local admitted, trials = n, {}
    if b == nil or b.state ~= 'CLOSED' then
        admitted, trials, retry_ms, b = breaker_allow(KEYS[2], KEYS[3], n, cfg, now)
    end
    tat = math.max(now, tonumber(redis.call('GET', KEYS[1]) or '0') or 0)
    local first = tat
    -- The horizon counts from the pace's next free slot: with another daemon holding the next ones, this
    -- batch follows them whole instead of getting the few slots left before now + horizon.
    local horizon_end = tat + a.horizon_ms
    for i = 1, n do
        slots[i], trial_ids[i] = -1, ''
        if i <= admitted then
            local slot = math.max(tat, a.dues[i])
            if slot > horizon_end then
                -- Not this batch after all: free the trial slot it would have used.
                if trials[i] then redis.call('ZREM', KEYS[3], trials[i]) end
            else
                slots[i], trial_ids[i] = slot, trials[i] or ''
                tat = slot + a.spacing_ms
            end
        end
    end
    if tat > first then
        redis.call('SET', KEYS[1], tat, 'PX', tat - now + 60000)
    end
end
if b == nil then
    b = breaker_load(KEYS[2])
    breaker_settle_time(b, cfg, now)
end
return cjson.encode({now_ms = now, slots = slots, trials = trial_ids, retry_after_ms = retry_ms, tat_ms = tat,
                     breaker = {state = b.state, failures = b.failures,
                                retry_after_ms = breaker_wait_ms(b, cfg, now)}})
