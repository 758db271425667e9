-- Adaptive checking's plan in Postgres (SPEC §5, §11). Additive only: three new tables and five functions.
--
-- Upstash bills every command a Lua script runs, so per-section state kept in Redis cost about forty
-- commands a check; Postgres bills no query. Each watched section's interval, priority, due time and lease
-- live here; Redis keeps only the shared scrape pace and the breaker (one script call per batch of checks).
-- Every time here is Redis time in milliseconds (the taker's estimate of it), so slots reserved from the
-- shared pace and due times compare on one clock across hosts. Each function is one statement's worth of
-- work and holds no session state, so all of it works through a transaction-mode pooler.

CREATE TABLE IF NOT EXISTS seatwatch_adaptive_plan (
    term            text    NOT NULL,
    class_nbr       text    NOT NULL,
    interval_ms     bigint  NOT NULL,
    priority        integer NOT NULL DEFAULT 0,
    due_ms          bigint  NOT NULL,   -- next due; a lease moves it to slot + interval + margin
    last_ms         bigint,             -- slot of the last lease (or the last check before adaptive); NULL: none
    added_ms        bigint  NOT NULL,   -- joined the plan (coverage counts a new section from here)
    leased_until_ms bigint,             -- a lease being slotted: nobody else takes it until then
    PRIMARY KEY (term, class_nbr)
);
CREATE INDEX IF NOT EXISTS seatwatch_adaptive_plan_due ON seatwatch_adaptive_plan (due_ms);

-- Scrapes slotted per minute (every daemon's), for the "scrapes in the last hour" figure; two hours kept.
CREATE TABLE IF NOT EXISTS seatwatch_adaptive_minutes (
    minute  bigint  PRIMARY KEY,       -- Redis ms / 60000
    scrapes integer NOT NULL
);

-- The daemons planning this schedule (seen within a few planning periods) and each one's last report for
-- `seatwatch status`.
CREATE TABLE IF NOT EXISTS seatwatch_adaptive_daemons (
    consumer text   PRIMARY KEY,
    seen_ms  bigint NOT NULL,
    report   jsonb  NOT NULL DEFAULT '{}'
);

ALTER TABLE seatwatch_adaptive_plan ENABLE ROW LEVEL SECURITY;
ALTER TABLE seatwatch_adaptive_minutes ENABLE ROW LEVEL SECURITY;
ALTER TABLE seatwatch_adaptive_daemons ENABLE ROW LEVEL SECURITY;

-- The schedule's figures: watched, covered (checked, or joined, within the promised interval and its
-- margin), scrapes slotted in the last hour, daemons seen within the TTL.
CREATE FUNCTION seatwatch_adaptive_figures(p_now_ms bigint, p_max_ms bigint, p_late_ms bigint,
                                           p_daemon_ttl_ms bigint)
RETURNS TABLE (watched integer, covered integer, scrapes_last_hour integer, daemons integer)
LANGUAGE sql STABLE SET search_path = public AS $$
    SELECT (SELECT count(*)::integer FROM seatwatch_adaptive_plan),
           (SELECT count(*)::integer FROM seatwatch_adaptive_plan
             WHERE COALESCE(last_ms, added_ms) >= p_now_ms - p_max_ms - p_late_ms),
           (SELECT COALESCE(sum(scrapes), 0)::integer FROM seatwatch_adaptive_minutes
             WHERE minute > p_now_ms / 60000 - 60 AND minute <= p_now_ms / 60000),
           (SELECT count(*)::integer FROM seatwatch_adaptive_daemons WHERE seen_ms >= p_now_ms - p_daemon_ttl_ms);
$$;

-- The planner's pass: the watched sections with their intervals and priorities. A new section is first due
-- at its last check + its interval, or, never checked, after its jitter (spread over its interval, so a cold
-- start is not one burst). A section whose interval changed is due at its last lease + the new interval
-- (never before last + minimum: intervals are >= it), unless a lease of it is being slotted right now.
-- Sections no longer watched leave. Returns the figures and how many left.
CREATE FUNCTION seatwatch_adaptive_sync(p_terms text[], p_nbrs text[], p_intervals_ms bigint[],
                                        p_priorities integer[], p_checked_ms bigint[], p_jitter_ms bigint[],
                                        p_now_ms bigint, p_late_ms bigint, p_max_ms bigint, p_consumer text,
                                        p_daemon_ttl_ms bigint, p_report jsonb)
RETURNS TABLE (watched integer, covered integer, scrapes_last_hour integer, daemons integer, removed integer)
LANGUAGE plpgsql SET search_path = public AS $$
DECLARE
    v_removed integer;
BEGIN
    DELETE FROM seatwatch_adaptive_plan p
    WHERE NOT EXISTS (SELECT 1 FROM unnest(p_terms, p_nbrs) AS u(term, class_nbr)
                      WHERE u.term = p.term AND u.class_nbr = p.class_nbr);
    GET DIAGNOSTICS v_removed = ROW_COUNT;
    INSERT INTO seatwatch_adaptive_plan AS p (term, class_nbr, interval_ms, priority, due_ms, last_ms, added_ms)
    SELECT u.term, u.class_nbr, u.interval_ms, u.priority,
           CASE WHEN u.checked_ms > 0 THEN u.checked_ms + u.interval_ms ELSE p_now_ms + u.jitter_ms END,
           CASE WHEN u.checked_ms > 0 THEN u.checked_ms END,
           p_now_ms
    FROM unnest(p_terms, p_nbrs, p_intervals_ms, p_priorities, p_checked_ms, p_jitter_ms)
         AS u(term, class_nbr, interval_ms, priority, checked_ms, jitter_ms)
    ON CONFLICT (term, class_nbr) DO UPDATE SET
        interval_ms = excluded.interval_ms,
        priority = excluded.priority,
        due_ms = CASE WHEN p.interval_ms <> excluded.interval_ms AND p.last_ms IS NOT NULL
                           AND (p.leased_until_ms IS NULL OR p.leased_until_ms < p_now_ms)
                      THEN p.last_ms + excluded.interval_ms + p_late_ms
                      ELSE p.due_ms END
    WHERE p.interval_ms <> excluded.interval_ms OR p.priority <> excluded.priority;
    DELETE FROM seatwatch_adaptive_minutes WHERE minute < p_now_ms / 60000 - 120;
    INSERT INTO seatwatch_adaptive_daemons AS d (consumer, seen_ms, report)
    VALUES (p_consumer, p_now_ms, p_report)
    ON CONFLICT (consumer) DO UPDATE SET seen_ms = excluded.seen_ms, report = excluded.report;
    DELETE FROM seatwatch_adaptive_daemons WHERE seen_ms < p_now_ms - p_daemon_ttl_ms;
    RETURN QUERY SELECT f.watched, f.covered, f.scrapes_last_hour, f.daemons, v_removed
                 FROM seatwatch_adaptive_figures(p_now_ms, p_max_ms, p_late_ms, p_daemon_ttl_ms) f;
END
$$;

-- The taker's lease: up to p_n sections due by p_until_ms, the most valuable first (due now: priority
-- first; then the earliest due), skipping rows another daemon is leasing at this moment. They are held for
-- p_held_until_ms while their slots are reserved; seatwatch_adaptive_settle then moves their due times
-- forward. A daemon that dies in between leaves them due again when the hold ends.
CREATE FUNCTION seatwatch_adaptive_lease(p_now_ms bigint, p_until_ms bigint, p_n integer, p_held_until_ms bigint)
RETURNS TABLE (term text, class_nbr text, due_ms bigint, last_ms bigint, priority integer)
LANGUAGE sql VOLATILE SET search_path = public AS $$
    WITH c AS (
        SELECT p.term, p.class_nbr
        FROM seatwatch_adaptive_plan p
        WHERE p.due_ms <= p_until_ms AND (p.leased_until_ms IS NULL OR p.leased_until_ms < p_now_ms)
        ORDER BY (p.due_ms <= p_now_ms) DESC,
                 CASE WHEN p.due_ms <= p_now_ms THEN p.priority ELSE 0 END DESC,
                 p.due_ms, p.term, p.class_nbr
        LIMIT p_n
        FOR UPDATE SKIP LOCKED
    )
    UPDATE seatwatch_adaptive_plan p SET leased_until_ms = p_held_until_ms
    FROM c WHERE p.term = c.term AND p.class_nbr = c.class_nbr
    RETURNING p.term, p.class_nbr, p.due_ms, p.last_ms, p.priority;
$$;

-- The lease's second half: each section given a slot (slot >= 0) is due again at slot + interval + margin
-- (so two checks of it, by any daemons, are never closer than its interval), and its scrape is counted in
-- its minute; a section given none (-1: the breaker or the horizon said no) is simply released. Only rows
-- still held by this lease (p_held_until_ms) are touched: a hold that ran out (a Redis call slower than the
-- hold) may have let another daemon lease the section, and then this slot must not be used. Returns the
-- sections settled with a slot: only those may be checked.
CREATE FUNCTION seatwatch_adaptive_settle(p_terms text[], p_nbrs text[], p_slots_ms bigint[], p_late_ms bigint,
                                          p_held_until_ms bigint)
RETURNS TABLE (term text, class_nbr text)
LANGUAGE plpgsql SET search_path = public AS $$
BEGIN
    RETURN QUERY
    WITH settled AS (
        UPDATE seatwatch_adaptive_plan p SET
            due_ms = CASE WHEN u.slot_ms >= 0 THEN u.slot_ms + p.interval_ms + p_late_ms ELSE p.due_ms END,
            last_ms = CASE WHEN u.slot_ms >= 0 THEN u.slot_ms ELSE p.last_ms END,
            leased_until_ms = NULL
        FROM unnest(p_terms, p_nbrs, p_slots_ms) AS u(term, class_nbr, slot_ms)
        WHERE p.term = u.term AND p.class_nbr = u.class_nbr AND p.leased_until_ms = p_held_until_ms
        RETURNING p.term, p.class_nbr, u.slot_ms
    ), counted AS (
        INSERT INTO seatwatch_adaptive_minutes AS m (minute, scrapes)
        SELECT s.slot_ms / 60000, count(*)::integer FROM settled s WHERE s.slot_ms >= 0 GROUP BY 1
        ON CONFLICT (minute) DO UPDATE SET scrapes = m.scrapes + excluded.scrapes
    )
    SELECT s.term, s.class_nbr FROM settled s WHERE s.slot_ms >= 0;
END
$$;

-- Sections handed back: a failed check due again at p_due_ms (never later than it already was), a slot that
-- could not start in time due now with its last check restored (p_restore, p_last_ms).
CREATE FUNCTION seatwatch_adaptive_again(p_terms text[], p_nbrs text[], p_due_ms bigint[], p_restore boolean[],
                                         p_last_ms bigint[])
RETURNS void
LANGUAGE sql VOLATILE SET search_path = public AS $$
    UPDATE seatwatch_adaptive_plan p SET
        due_ms = LEAST(p.due_ms, u.due_ms),
        last_ms = CASE WHEN u.restore THEN u.last_ms ELSE p.last_ms END
    FROM unnest(p_terms, p_nbrs, p_due_ms, p_restore, p_last_ms) AS u(term, class_nbr, due_ms, restore, last_ms)
    WHERE p.term = u.term AND p.class_nbr = u.class_nbr;
$$;

DO $$
DECLARE
    f regprocedure;
    t text;
    r text;
BEGIN
    FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
             WHERE p.pronamespace = 'public'::regnamespace
               AND p.proname IN ('seatwatch_adaptive_figures', 'seatwatch_adaptive_sync', 'seatwatch_adaptive_lease',
                                 'seatwatch_adaptive_settle', 'seatwatch_adaptive_again') LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f);
        FOREACH r IN ARRAY ARRAY['anon', 'authenticated'] LOOP
            IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
                EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM %I', f, r);
            END IF;
        END LOOP;
    END LOOP;
    FOREACH t IN ARRAY ARRAY['seatwatch_adaptive_plan', 'seatwatch_adaptive_minutes', 'seatwatch_adaptive_daemons'] LOOP
        FOREACH r IN ARRAY ARRAY['anon', 'authenticated'] LOOP
            IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
                EXECUTE format('REVOKE ALL ON TABLE %I FROM %I', t, r);
            END IF;
        END LOOP;
    END LOOP;
END
$$;
