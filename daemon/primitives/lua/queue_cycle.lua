-- include: lib_time
-- include: breaker_lib
-- include: queue_lib
-- queue_cycle: settle finished batch entries, record breaker outcomes, take new entries and admit their
-- sections through the breaker, in one atomic step. Nothing in it costs a command per section.
-- KEYS[1] stream, KEYS[2] delayed set, KEYS[3] dead letters, KEYS[4] breaker hash, KEYS[5] breaker trials,
-- KEYS[6] this call's reply cache (named by a cycle id),
-- KEYS[7] (optional) the reply cache of this consumer's previous cycle, no longer needed: deleted
-- ARGV[1] group, ARGV[2] JSON {
--   cfg: breaker cfg + dlq_maxlen,
--   outcomes: [[kind, trial_id], ...]  breaker outcomes in the order the calls finished,
--   settle: [{entry_id, jobs = [DoneWire, ...]}, ...]  entries whose every section is done (jobs.EntryWire);
--         a section's action: ack | retry (spends the attempt counted in `attempts`) | defer (spends none)
--                 | requeue (back to the stream now, spends none: interrupted by shutdown)
--                 | dead (dead-letter) | poison (not a job: dead-letter as is),
--   read: [JobWire, ...]  sections of entries just read by the blocking reader, to admit,
--   fetch: n  when nothing is given in read, take up to n new entries for this consumer here (no blocking)
-- }
-- ARGV[3] consumer name (for fetch)
-- An entry's settlement applies only while the entry is still pending (XACK answers 1): an entry taken over
-- after the visibility timeout has been requeued by the maintenance, which now owns its sections. Its
-- retries and deferrals go to the delayed set as one member, its requeues back to the stream as one entry.
-- Reply: JSON {admitted, trials, retry_after_ms, fetched, bad, poisoned, breaker, next_due_ms}. `fetched`
--   lists the sections this call read (JobWire); `bad` lists {entry_id, reason, raw} of sections of a
--   fetched batch that are not jobs (the caller settles them as poison with their entry); `poisoned` lists
--   {entry_id, reason} of fetched entries that were not jobs at all (now dead letters). The first
--   `admitted` sections may run; the caller defers the rest. `next_due_ms`: the earliest retry this call
--   delayed (-1: none). A call whose reply was lost is retried with the same cycle id: it gets the cached
--   reply and changes nothing, so no outcome is applied twice.
local cached = redis.call('GET', KEYS[6])
if cached then return cached end
local now = now_ms()
local group = ARGV[1]
local a = cjson.decode(ARGV[2])
local cfg = a.cfg
local b
if #a.outcomes > 0 then
    b = breaker_record(KEYS[4], KEYS[5], a.outcomes, cfg, now)
else
    b = breaker_load(KEYS[4])
    breaker_settle_time(b, cfg, now)
end
local wait_ms = breaker_wait_ms(b, cfg, now)
local next_due = -1

for _, s in ipairs(a.settle) do
    local eid = s.entry_id
    local owned = q_remove(KEYS[1], group, eid)
    local requeue, retry, delay, enqueued = {}, {}, 0, nil
    for _, d in ipairs(s.jobs) do
        local action = d.action
        if action == 'poison' then
            q_dead(KEYS[3], cfg.dlq_maxlen, d.id, d.term, d.class_nbr, d.attempts, d.error, eid, now, d.raw)
        elseif owned then
            if enqueued == nil or tonumber(d.enqueued_ms) < enqueued then enqueued = tonumber(d.enqueued_ms) end
            local section = {d.term, d.class_nbr, tonumber(d.attempts)}
            if action == 'retry' or action == 'defer' then
                local ms = tonumber(d.delay_ms)
                if action == 'retry' then ms = math.max(ms, wait_ms) end
                delay = math.max(delay, ms)
                retry[#retry + 1] = section
            elseif action == 'requeue' then
                requeue[#requeue + 1] = section
            elseif action == 'dead' then
                q_dead(KEYS[3], cfg.dlq_maxlen, d.id, d.term, d.class_nbr, d.attempts, d.error, eid, now, '')
            end
        end
    end
    if #requeue > 0 then q_add(KEYS[1], requeue, enqueued) end
    if #retry > 0 then
        q_delay(KEYS[2], now + delay, retry, enqueued)
        if next_due < 0 or now + delay < next_due then next_due = now + delay end
    end
end

local fetched, bad, poisoned = {}, {}, {}
if #a.read == 0 and (a.fetch or 0) > 0 then
    local got = q_group_call(KEYS[1], group,
        'XREADGROUP', 'GROUP', group, ARGV[3], 'COUNT', a.fetch, 'STREAMS', KEYS[1], '>')
    if got then
        for _, e in ipairs(got[1][2]) do
            local eid, f = e[1], q_fields(e)
            local batch, enqueued, why = q_sections(f)
            if batch == nil then
                q_remove(KEYS[1], group, eid)
                q_dead(KEYS[3], cfg.dlq_maxlen, f.id, f.term, f.class_nbr, 0, why, eid, now, cjson.encode(f))
                poisoned[#poisoned + 1] = {entry_id = eid, reason = why}
            else
                for _, sec in ipairs(batch) do
                    local bad_why = q_bad_section(sec)
                    if bad_why then
                        bad[#bad + 1] = {entry_id = eid, reason = bad_why, raw = cjson.encode(sec)}
                    else
                        -- Numbers stay strings: cjson would round an enqueued_ms past 14 digits.
                        fetched[#fetched + 1] = {entry_id = eid, id = sec[1] .. '-' .. sec[2], term = sec[1],
                            class_nbr = sec[2], attempts = tostring(sec[3]), enqueued_ms = enqueued}
                    end
                end
            end
        end
    end
    for _, r in ipairs(fetched) do a.read[#a.read + 1] = r end
end

local admitted, trials, retry_ms = 0, {}, 0
if #a.read > 0 then
    admitted, trials, retry_ms, b = breaker_allow_loaded(KEYS[4], KEYS[5], b, #a.read, cfg, now)
end

local reply = cjson.encode({
    admitted = admitted,
    trials = trials,
    retry_after_ms = retry_ms,
    fetched = fetched,
    bad = bad,
    poisoned = poisoned,
    breaker = breaker_view(KEYS[5], b, cfg, now),
    next_due_ms = next_due,
})
redis.call('SET', KEYS[6], reply, 'PX', 600000)
if KEYS[7] then redis.call('DEL', KEYS[7]) end
return reply
