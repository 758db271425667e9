-- queue_lib: the job index shared by the queue scripts.
--
-- The stream holds only waiting and in-flight entries: an entry is deleted when it is settled. Each entry
-- has the fields id ("{term}-{class_nbr}"), term, class_nbr, attempts (spent before this delivery) and
-- enqueued_ms. The jobs hash maps id -> the entry id that currently stands for the job, or 'z' while it
-- waits in the delayed set; it is the dedup index, and an entry whose id no longer maps to it has been
-- superseded (taken over after the visibility timeout) and is only cleaned up.

local function q_add(stream, jobs, id, term, class_nbr, attempts, enqueued_ms)
    local eid = redis.call('XADD', stream, '*', 'id', id, 'term', term, 'class_nbr', class_nbr,
        'attempts', attempts, 'enqueued_ms', enqueued_ms)
    redis.call('HSET', jobs, id, eid)
    return eid
end

-- Is the job waiting, running or delayed? A stale index entry (its stream entry or delayed member gone)
-- reads as not live, so the job can be enqueued again instead of being lost forever.
local function q_live(stream, jobs, delayed, id)
    local cur = redis.call('HGET', jobs, id)
    if not cur then return false end
    if cur == 'z' then return redis.call('ZSCORE', delayed, id) ~= false end
    return #redis.call('XRANGE', stream, cur, cur) > 0
end

local function q_owned(jobs, id, eid)
    return id ~= nil and id ~= '' and redis.call('HGET', jobs, id) == eid
end

local function q_remove(stream, group, eid)
    redis.call('XACK', stream, group, eid)
    redis.call('XDEL', stream, eid)
end

local function q_delay(jobs, delayed, payloads, id, due_ms, term, class_nbr, attempts, enqueued_ms)
    redis.call('ZADD', delayed, due_ms, id)
    redis.call('HSET', payloads, id, cjson.encode({term = term, class_nbr = class_nbr,
        attempts = tonumber(attempts), enqueued_ms = tonumber(enqueued_ms)}))
    redis.call('HSET', jobs, id, 'z')
end

local function q_dead(dlq, maxlen, id, term, class_nbr, attempts, error, eid, now, raw)
    redis.call('XADD', dlq, 'MAXLEN', '~', maxlen, '*', 'id', id or '', 'term', term or '',
        'class_nbr', class_nbr or '', 'attempts', attempts or 0, 'error', error, 'entry', eid,
        'failed_ms', now, 'raw', raw or '')
end

local function q_fields(entry)
    local f = {}
    local kv = entry[2]
    for i = 1, #kv, 2 do f[kv[i]] = kv[i + 1] end
    return f
end

-- Move due delayed jobs back into the stream (at most count). Returns how many moved.
local function q_promote(stream, jobs, delayed, payloads, now, count)
    local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, count)
    for _, id in ipairs(due) do
        local p = redis.call('HGET', payloads, id)
        if p then
            local f = cjson.decode(p)
            q_add(stream, jobs, id, f.term, f.class_nbr, f.attempts, f.enqueued_ms)
        elseif redis.call('HGET', jobs, id) == 'z' then
            redis.call('HDEL', jobs, id)
        end
        redis.call('ZREM', delayed, id)
        redis.call('HDEL', payloads, id)
    end
    return #due
end

local function q_next_due(delayed)
    local first = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
    if first[2] then return tonumber(first[2]) end
    return -1
end

-- The group every daemon reads through, created (with the stream) if an operator or an eviction removed it.
-- Call before any write, so a script never fails halfway on NOGROUP.
local function q_ensure_group(stream, group)
    local r = redis.pcall('XPENDING', stream, group)
    if type(r) == 'table' and r.err then
        redis.call('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
    end
end

-- Why a stream entry is not a job, or nil when it is one; the same rules, in the same order, as the
-- reader's queue.parse_entry, so an entry fares the same whichever path takes it.
local function q_not_a_job(f)
    if f.term == nil or f.term == '' or f.class_nbr == nil or f.class_nbr == '' then
        return 'malformed entry: no term or class_nbr'
    end
    if not (string.find(f.term, '^[!-~]+$') and string.find(f.class_nbr, '^[!-~]+$')) then
        return 'malformed entry: term or class_nbr is not printable ASCII'
    end
    if f.id ~= f.term .. '-' .. f.class_nbr then
        return 'malformed entry: id does not match term and class_nbr'
    end
    local attempts, enqueued = f.attempts or '0', f.enqueued_ms or '0'
    if not (string.find(attempts, '^%d+$') and string.find(enqueued, '^%d+$')) then
        return 'malformed entry: attempts or enqueued_ms is not a whole number'
    end
    if #attempts > 4 or tonumber(attempts) > 1000 or #enqueued > 16 or tonumber(enqueued) > 9007199254740992 then
        return 'malformed entry: attempts or enqueued_ms out of range'
    end
    return nil
end
