"""jobs announce their own final state: NOTIFY from a trigger, not a statement of the application's

Revision ID: 0010
Revises: 0009

A job that reaches succeeded, failed or canceled is announced on `clipmask_job_finished` (API
processes holding `Prefer: wait` requests listen) and, when canceled, on `clipmask_job_canceled`
(workers listen, to stop its run). The application sent these with a `SELECT pg_notify(...)` of its
own in each finishing transaction: a third statement and round trip in every job's last commit.
This row trigger sends the same notifications, in the same transaction (so still only on commit),
and for every way a job can finish, including any added later. Payload: the job's id.
"""

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
        CREATE FUNCTION clipmask_job_final_notify() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('clipmask_job_finished', NEW.id);
            IF NEW.status = 'canceled' THEN
                PERFORM pg_notify('clipmask_job_canceled', NEW.id);
            END IF;
            RETURN NULL;
        END $$
    """)
    op.execute("""
        CREATE TRIGGER jobs_final_notify AFTER UPDATE OF status ON jobs FOR EACH ROW
        WHEN (NEW.status IN ('succeeded', 'failed', 'canceled') AND OLD.status IS DISTINCT FROM NEW.status)
        EXECUTE FUNCTION clipmask_job_final_notify()
    """)


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS jobs_final_notify ON jobs")
    op.execute("DROP FUNCTION IF EXISTS clipmask_job_final_notify()")
