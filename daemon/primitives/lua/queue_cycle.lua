-- include: lib_time
-- include: breaker_lib
-- include: queue_lib
-- queue_cycle: settle finished jobs, take new ones, and admit them through the breaker, in one atomic step.
-- KEYS[1] stream, KEYS[2] jobs hash, KEYS[3] delayed set, KEYS[4] delayed payloads, KEYS[5] dead letters,
-- KEYS[6] breaker hash, KEYS[7] breaker trials, KEYS[8] this call's reply cache (named by a cycle id),
-- KEYS[9] (optional) the reply cache of this consumer's previous cycle, no longer needed: deleted
-- ARGV[1] group, ARGV[2] JSON {
--   cfg: breaker cfg + dlq_maxlen,
--   outcomes: [[kind, trial_id], ...]  breaker outcomes in the order the calls finished,
--   done: [{entry_id, id, action, delay_ms, term, class_nbr, attempts, enqueued_ms, error, raw}, ...]
--         (jobs.DoneWire) action: ack | retry (spends the attempt counted in `attempts`) | defer (spends none)
--                 | requeue (back to the stream now, spends none: a job interrupted by shutdown)
--                 | dead (dead-letter) | poison (malformed entry: dead-letter as is),
--   read: [{entry_id, id, term, class_nbr, attempts, enqueued_ms}, ...]  entries just read, to admit
--         (jobs.JobWire),
--   fetch: n  when no entries are given, read up to n new ones for this consumer here (no blocking)
-- }
-- ARGV[3] consumer name (for fetch)
-- Reply: JSON {admitted, trials, retry_after_ms, deferred, fetched, poisoned, breaker, next_due_ms, stream,
--   pending, delayed, dead_letters}. `fetched` lists the entries this call read (as `read` gives them);
--   `poisoned` lists {entry_id, reason} of fetched entries that were not jobs (now dead letters).
--   A call whose reply was lost is retried with the same cycle id: it gets the cached reply and changes
--   nothing, so no outcome is applied twice.
--   The first `admitted` read entries may run; the rest went back to the delayed set until the breaker
--   may admit again, without spending an attempt. A retry is never due before the breaker reopens.
local cached = redis.call('GET', KEYS[8])
if cached then return cached end
local now = now_ms()
local group = ARGV[1]
q_ensure_group(KEYS[1], group)
local a = cjson.decode(ARGV[2])
local cfg = a.cfg
local b
if #a.outcomes > 0 then
    b = breaker_record(KEYS[6], KEYS[7], a.outcomes, cfg, now)
else
    b = breaker_load(KEYS[6])
    breaker_settle_time(b, cfg, now)
end
local wait_ms = breaker_wait_ms(b, cfg, now)

for _, d in ipairs(a.done) do
    local eid, id, action = d.entry_id, d.id, d.action
    local owned = q_owned(KEYS[2], id, eid)
    q_remove(KEYS[1], group, eid)
    if action == 'poison' then
        q_dead(KEYS[5], cfg.dlq_maxlen, id, d.term, d.class_nbr, d.attempts, d.error, eid, now, d.raw)
    elseif owned then
        if action == 'ack' then
            redis.call('HDEL', KEYS[2], id)
        elseif action == 'retry' or action == 'defer' then
            local delay = tonumber(d.delay_ms)
            if action == 'retry' then delay = math.max(delay, wait_ms) end
            q_delay(KEYS[2], KEYS[3], KEYS[4], id, now + delay, d.term, d.class_nbr, d.attempts, d.enqueued_ms)
        elseif action == 'requeue' then
            q_add(KEYS[1], KEYS[2], id, d.term, d.class_nbr, d.attempts, d.enqueued_ms)
        elseif action == 'dead' then
            q_dead(KEYS[5], cfg.dlq_maxlen, id, d.term, d.class_nbr, d.attempts, d.error, eid, now, '')
            redis.call('HDEL', KEYS[2], id)
        end
    end
end

local fetched, poisoned = {}, {}
if #a.read == 0 and (a.fetch or 0) > 0 then
    local got = redis.call('XREADGROUP', 'GROUP', group, ARGV[3], 'COUNT', a.fetch, 'STREAMS', KEYS[1], '>')
    if got then
        for _, e in ipairs(got[1][2]) do
            local eid, f = e[1], q_fields(e)
            local why = q_not_a_job(f)
            if why == nil then
                -- Numbers stay strings: cjson would round an enqueued_ms past 14 digits.
                fetched[#fetched + 1] = {entry_id = eid, id = f.id, term = f.term, class_nbr = f.class_nbr,
                    attempts = f.attempts or '0', enqueued_ms = f.enqueued_ms or '0'}
            else
                q_remove(KEYS[1], group, eid)
                q_dead(KEYS[5], cfg.dlq_maxlen, f.id, f.term, f.class_nbr, 0, why, eid, now, cjson.encode(f))
                poisoned[#poisoned + 1] = {entry_id = eid, reason = why}
            end
        end
    end
    for _, r in ipairs(fetched) do a.read[#a.read + 1] = r end
end

local admitted, trials, retry_ms, deferred = 0, {}, 0, 0
local n = #a.read
if n > 0 then
    admitted, trials, retry_ms, b = breaker_allow(KEYS[6], KEYS[7], n, cfg, now)
    for i = admitted + 1, n do
        local r = a.read[i]
        local owned = q_owned(KEYS[2], r.id, r.entry_id)
        q_remove(KEYS[1], group, r.entry_id)
        if owned then
            q_delay(KEYS[2], KEYS[3], KEYS[4], r.id, now + retry_ms, r.term, r.class_nbr, r.attempts, r.enqueued_ms)
            deferred = deferred + 1
        end
    end
end

local summary = redis.call('XPENDING', KEYS[1], group)
local reply = cjson.encode({
    admitted = admitted,
    trials = trials,
    retry_after_ms = retry_ms,
    deferred = deferred,
    fetched = fetched,
    poisoned = poisoned,
    breaker = breaker_view(KEYS[7], b, cfg, now),
    next_due_ms = q_next_due(KEYS[3]),
    stream = redis.call('XLEN', KEYS[1]),
    pending = summary[1],
    delayed = redis.call('ZCARD', KEYS[3]),
    dead_letters = redis.call('XLEN', KEYS[5]),
})
redis.call('SET', KEYS[8], reply, 'PX', 600000)
if KEYS[9] then redis.call('DEL', KEYS[9]) end
return reply
