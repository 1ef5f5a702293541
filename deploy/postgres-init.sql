-- compose.yaml: the databases of the orchestrator and of each participant, the saga_* group
-- roles (sql/004_roles.sql creates the same ones when they are missing) and login users.
CREATE DATABASE orchestrator;
CREATE DATABASE inventory;
CREATE DATABASE payment;
CREATE DATABASE orders;
CREATE DATABASE shipping;
CREATE ROLE saga_orchestrator NOLOGIN;
CREATE ROLE saga_relay NOLOGIN;
CREATE ROLE saga_client NOLOGIN;
CREATE ROLE saga_operator NOLOGIN;
CREATE ROLE orchestrator LOGIN PASSWORD 'orchestrator' IN ROLE saga_orchestrator;
CREATE ROLE relay LOGIN PASSWORD 'relay' IN ROLE saga_relay;
CREATE ROLE operator LOGIN PASSWORD 'operator' IN ROLE saga_operator;
