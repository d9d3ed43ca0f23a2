-- `status`: is the change-tracking trigger of `init --track-changes` installed and enabled?
SELECT EXISTS (
    SELECT 1 FROM pg_trigger
    WHERE tgrelid = to_regclass(%(relation)s) AND tgname = %(trigger)s AND tgenabled <> 'D'
);
