-- include: lib_time
-- include: queue_lib
-- queue_maintain: promote due delayed batches, requeue entries nobody acknowledged in time, and count.
-- KEYS[1] stream, KEYS[2] delayed set, KEYS[3] the old layout's delayed payloads, KEYS[4] dead letters
-- ARGV[1] group, ARGV[2] consumer whose entries to take regardless of idle time ('' = every consumer's
-- entries idle at least ARGV[3] ms), ARGV[3] min idle ms, ARGV[4] max attempts, ARGV[5] batch size,
-- ARGV[6] dead-letter stream max length
-- A requeued entry's sections go back as one new entry with one more attempt spent each (its delivery
-- died or timed out), or become dead letters when their attempts are used up; the old entry is
-- acknowledged and deleted, so a slow consumer's late settlement of it changes nothing.
-- Cost when there is nothing to do: TIME, ZRANGE, XPENDING, XRANGE, XLEN (the last two are the figures).
-- Reply: JSON {promoted, requeued, dead, next_due_ms, next_reclaim_ms, stream, pending, delayed,
--   dead_letters, now_ms}; the counts are sections.
local now = now_ms()
local group, consumer = ARGV[1], ARGV[2]
local min_idle, max_attempts = tonumber(ARGV[3]), tonumber(ARGV[4])
local count, maxlen = tonumber(ARGV[5]), tonumber(ARGV[6])

-- Promote: the delayed set holds batches (and perhaps the old layout's single jobs), so all of it is read.
local promoted, next_due, delayed, due = 0, -1, 0, {}
local members = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
for i = 1, #members, 2 do
    local m, score = members[i], tonumber(members[i + 1])
    local batch, enqueued
    if string.sub(m, 1, 1) == '{' then
        local ok, d = pcall(cjson.decode, m)
        if ok and type(d) == 'table' and type(d.b) == 'table' then batch, enqueued = d.b, d.e end
    end
    if score <= now and #due < count then
        due[#due + 1] = m
        if batch then
            q_add(KEYS[1], batch, enqueued or now)
            promoted = promoted + #batch
        elseif string.sub(m, 1, 1) ~= '{' then
            -- The old layout: the member is a job id, its payload in a hash.
            local p = redis.call('HGET', KEYS[3], m)
            if p then
                local f = cjson.decode(p)
                q_add(KEYS[1], {{f.term, f.class_nbr, tonumber(f.attempts) or 0}}, f.enqueued_ms or now)
                redis.call('HDEL', KEYS[3], m)
                promoted = promoted + 1
            end
        end
    else
        delayed = delayed + (batch and #batch or 1)
        if next_due < 0 or score < next_due then next_due = score end
    end
end
if #due > 0 then redis.call('ZREM', KEYS[2], unpack(due)) end

-- Reclaim: one look at the pending list gives the stale entries and when the next could become stale.
-- (Pending entries are batches: ten thousand of them is far more than any queue here holds.)
local pending_list = q_group_call(KEYS[1], group, 'XPENDING', KEYS[1], group, '-', '+', 10000)
local requeued, dead, next_reclaim, taken, pending_ids = 0, 0, -1, 0, {}
for _, p in ipairs(pending_list) do
    local eid, owner, idle, deliveries = p[1], p[2], tonumber(p[3]), p[4]
    local stale
    if consumer ~= '' then stale = owner == consumer else stale = idle >= min_idle end
    if not stale or taken >= count then
        pending_ids[eid] = true
    end
    if stale and taken < count then
        taken = taken + 1
        local entries = redis.call('XRANGE', KEYS[1], eid, eid)
        q_remove(KEYS[1], group, eid)
        if #entries > 0 then
            local f = q_fields(entries[1])
            local batch, enqueued, why = q_sections(f)
            if batch == nil then
                -- Not a job (written by something else): dead-letter it as it is, never just drop it.
                q_dead(KEYS[4], maxlen, f.id, f.term, f.class_nbr, 0, why, eid, now, cjson.encode(f))
                dead = dead + 1
            else
                local again = {}
                for _, s in ipairs(batch) do
                    local bad = q_bad_section(s)
                    if bad then
                        q_dead(KEYS[4], maxlen, '', '', '', 0, bad, eid, now, cjson.encode(s))
                        dead = dead + 1
                    elseif s[3] + 1 >= max_attempts then
                        q_dead(KEYS[4], maxlen, s[1] .. '-' .. s[2], s[1], s[2], s[3] + 1,
                            'no acknowledgement from consumer ' .. owner .. ' (' .. deliveries ..
                            ' deliveries); attempts used up', eid, now, '')
                        dead = dead + 1
                    else
                        again[#again + 1] = {s[1], s[2], s[3] + 1}
                    end
                end
                if #again > 0 then
                    q_add(KEYS[1], again, enqueued)
                    requeued = requeued + #again
                end
            end
        end
    elseif min_idle > 0 then
        local left = math.max(0, min_idle - idle)
        if next_reclaim < 0 or left < next_reclaim then next_reclaim = left end
    end
end

-- The figures, in sections: the stream holds waiting and pending entries only.
local waiting, pending = q_count(KEYS[1], pending_ids)
return cjson.encode({
    promoted = promoted,
    requeued = requeued,
    dead = dead,
    next_due_ms = next_due,
    next_reclaim_ms = next_reclaim,
    stream = waiting + pending,
    pending = pending,
    delayed = delayed,
    dead_letters = redis.call('XLEN', KEYS[4]),
    now_ms = now,
})
