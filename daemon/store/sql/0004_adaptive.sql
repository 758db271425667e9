-- Adaptive checking (SPEC §11): what the planner reads once a minute. Additive only: one new function.
--
-- One row per watched (term, class_nbr): how many watchers an opening would email now (eligible users,
-- as seatwatch_claim picks them, whose seat_available claim is not held), when seatwatch last checked the
-- section and when its seats or instructor last changed (its own state, else the legacy class_states row
-- of the same term).
CREATE FUNCTION seatwatch_adaptive_sections()
RETURNS TABLE (term text, class_nbr text, waiting integer, last_checked_at timestamptz,
               last_changed_at timestamptz)
LANGUAGE sql STABLE SET search_path = public AS $$
    WITH per_watch AS (
        SELECT w.term, w.class_nbr,
               (u.email IS NOT NULL AND u.email <> ''
                AND COALESCE(p.notifications_enabled, true)
                AND NOT COALESCE(p.email_bounced, false)
                AND NOT COALESCE(p.spam_complained, false)
                AND NOT COALESCE(p.is_disabled, false)
                AND NOT EXISTS (
                    SELECT 1 FROM notifications_sent ns
                    WHERE ns.class_watch_id = w.id AND ns.notification_type = 'seat_available'
                      AND ns.expires_at > now()
                )) AS waiting
        FROM class_watches w
        LEFT JOIN auth.users u ON u.id = w.user_id
        LEFT JOIN user_profiles p ON p.user_id = w.user_id
    ), sections AS (
        SELECT pw.term, pw.class_nbr, count(*) FILTER (WHERE pw.waiting)::integer AS waiting
        FROM per_watch pw
        GROUP BY pw.term, pw.class_nbr
    )
    SELECT s.term, s.class_nbr, s.waiting,
           COALESCE(st.last_checked_at, cs.last_checked_at),
           COALESCE(st.last_changed_at, cs.last_changed_at)
    FROM sections s
    LEFT JOIN seatwatch_section_states st ON st.term = s.term AND st.class_nbr = s.class_nbr
    LEFT JOIN class_states cs ON st.term IS NULL AND cs.class_nbr = s.class_nbr AND cs.term = s.term
    ORDER BY 1, 2;
$$;

REVOKE EXECUTE ON FUNCTION seatwatch_adaptive_sections() FROM PUBLIC;
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['anon', 'authenticated'] LOOP
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            EXECUTE format('REVOKE EXECUTE ON FUNCTION seatwatch_adaptive_sections() FROM %I', r);
        END IF;
    END LOOP;
END
$$;
