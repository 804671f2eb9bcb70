#!/bin/sh
# First start of the PostgreSQL volume: one user and database for the job store, one for
# MLflow. Passwords arrive as psql variables, never spliced into SQL by the shell.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -v sparkorch_password="$SPARKORCH_DB_PASSWORD" \
    -v mlflow_password="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE USER sparkorch WITH PASSWORD :'sparkorch_password';
CREATE DATABASE sparkorch OWNER sparkorch;
CREATE USER mlflow WITH PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
SQL
