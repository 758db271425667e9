-- include: lib_time
-- include: queue_lib
-- queue_maintain: promote due delayed jobs, and requeue entries nobody acknowledged in time.
-- KEYS[1] stream, KEYS[2] jobs hash, KEYS[3] delayed set, KEYS[4] delayed payloads, KEYS[5] dead letters
-- ARGV[1] group, ARGV[2] consumer whose entries to take regardless of idle time ('' = every consumer's
-- entries idle at least ARGV[3] ms), ARGV[3] min idle ms, ARGV[4] max attempts, ARGV[5] batch size,
-- ARGV[6] dead-letter stream max length
-- A requeued entry becomes a new entry with one more attempt spent (its delivery died or timed out), or a
-- dead letter when the attempts are used up; the old entry is acknowledged and deleted. Only the entry
-- that still stands for its job is requeued, so a job is never duplicated by this.
-- Reply: JSON {promoted, requeued, dead, next_due_ms, next_reclaim_ms, stream, pending, delayed, dead_letters}
local now = now_ms()
local group, consumer = ARGV[1], ARGV[2]
local min_idle, max_attempts = tonumber(ARGV[3]), tonumber(ARGV[4])
local count, maxlen = tonumber(ARGV[5]), tonumber(ARGV[6])

q_ensure_group(KEYS[1], group)
local promoted = q_promote(KEYS[1], KEYS[2], KEYS[3], KEYS[4], now, count)

local stale
if consumer ~= '' then
    stale = redis.call('XPENDING', KEYS[1], group, '-', '+', count, consumer)
else
    stale = redis.call('XPENDING', KEYS[1], group, 'IDLE', min_idle, '-', '+', count)
end
local requeued, dead = 0, 0
for _, p in ipairs(stale) do
    local eid, owner, deliveries = p[1], p[2], p[4]
    local entries = redis.call('XRANGE', KEYS[1], eid, eid)
    q_remove(KEYS[1], group, eid)
    if #entries > 0 then
        local f = q_fields(entries[1])
        local why = q_not_a_job(f)
        if why ~= nil then
            -- Not a job (written by something else): dead-letter it as it is, never just drop it.
            q_dead(KEYS[5], maxlen, f.id, f.term, f.class_nbr, 0, why, eid, now, cjson.encode(f))
            dead = dead + 1
        elseif q_owned(KEYS[2], f.id, eid) then
            local attempts = (tonumber(f.attempts) or 0) + 1
            if attempts >= max_attempts then
                q_dead(KEYS[5], maxlen, f.id, f.term, f.class_nbr, attempts,
                    'no acknowledgement from consumer ' .. owner .. ' (' .. deliveries ..
                    ' deliveries); attempts used up', eid, now, '')
                redis.call('HDEL', KEYS[2], f.id)
                dead = dead + 1
            else
                q_add(KEYS[1], KEYS[2], f.id, f.term, f.class_nbr, attempts, f.enqueued_ms or now)
                requeued = requeued + 1
            end
        end
    end
end

-- When could the next entry become reclaimable? Look at the oldest pending entries.
local next_reclaim = -1
if min_idle > 0 then
    local oldest = redis.call('XPENDING', KEYS[1], group, '-', '+', 100)
    for _, p in ipairs(oldest) do
        local left = math.max(0, min_idle - tonumber(p[3]))
        if next_reclaim < 0 or left < next_reclaim then next_reclaim = left end
    end
end

local summary = redis.call('XPENDING', KEYS[1], group)
return cjson.encode({
    promoted = promoted,
    requeued = requeued,
    dead = dead,
    next_due_ms = q_next_due(KEYS[3]),
    next_reclaim_ms = next_reclaim,
    stream = redis.call('XLEN', KEYS[1]),
    pending = summary[1],
    delayed = redis.call('ZCARD', KEYS[3]),
    dead_letters = redis.call('XLEN', KEYS[5]),
    now_ms = now,
})
