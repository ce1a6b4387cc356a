-- Second database of the compose stack's PostgreSQL (the first, 'prefect', comes from POSTGRES_DB).
CREATE DATABASE mlflow;
