#!/usr/bin/env bash
# Single-node Apache Kafka (KRaft, combined broker+controller) on loopback, from Maven jars.
#
#   kafka.sh fetch                                   download jars into the cache (once per machine)
#   kafka.sh start --data-dir DIR [--port 9092] [--controller-port PORT] [--heap 512m]
#                                                    format storage if new, start, wait until ready;
#                                                    the controller port is stored with the data and
#                                                    reused; existing data is never deleted (a
#                                                    different --controller-port is refused)
#          [--sasl-ssl-port PORT --tls-dir DIR --plain-user U:P... --scram-user U:P...]
#                                                    ...plus a SASL_SSL listener (see security_* below)
#   kafka.sh stop  --data-dir DIR                    SIGTERM, wait, SIGKILL if it will not go
#   kafka.sh status --data-dir DIR                   exit 0 when running
#
# Environment: FLYWHEEL_KAFKA_VERSION (default 4.1.1), FLYWHEEL_CACHE (default ~/.cache/flywheel),
# JAVA (default: java on PATH; needs Java 17+).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VERSION="${FLYWHEEL_KAFKA_VERSION:-4.1.1}"
CACHE="${FLYWHEEL_CACHE:-$HOME/.cache/flywheel}"
LIBS="$CACHE/kafka-$VERSION/libs"
JAVA="${JAVA:-java}"

die() { echo "kafka.sh: $*" >&2; exit 1; }

fetch() {
  if [[ -f "$LIBS/.complete" ]]; then return 0; fi
  command -v mvn >/dev/null || die "mvn not found (needed once to fetch Kafka jars)"
  echo "kafka.sh: fetching Apache Kafka $VERSION jars into $LIBS" >&2
  rm -rf "$LIBS.tmp"
  mvn -q -B -f "$HERE/pom.xml" -Dkafka.version="$VERSION" \
    dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$LIBS.tmp" >&2
  rm -rf "$LIBS" && mv "$LIBS.tmp" "$LIBS" && touch "$LIBS/.complete"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# ---- SASL_SSL listener (optional) -------------------------------------------------------------
# --sasl-ssl-port PORT adds a SASL_SSL listener beside the PLAINTEXT one (which stays for
# readiness and inter-broker traffic). --tls-dir holds PEM ca.crt, server.crt and server.key
# (PKCS#8, unencrypted); --plain-user and --scram-user (repeatable, NAME:PASSWORD) are the
# PLAIN users (JAAS) and the SCRAM-SHA-512 users (stored by `kafka-storage format --add-scram`,
# so they are created when the storage is first formatted).
SASL_SSL_PORT="" TLS_DIR="" PLAIN_USERS=() SCRAM_USERS=()

security_option() {
  case "$1" in
    --sasl-ssl-port) SASL_SSL_PORT="$2" ;;
    --tls-dir) TLS_DIR="$(cd "$2" && pwd)" ;;
    --plain-user) PLAIN_USERS+=("$2") ;;
    --scram-user) SCRAM_USERS+=("$2") ;;
  esac
}

# Appended to server.properties: later keys win, so the listener lines are redefined here.
security_properties() {
  local data_dir="$1" port="$2" cport="$3"
  [[ -n "$SASL_SSL_PORT" ]] || return 0
  [[ -f "$TLS_DIR/server.crt" && -f "$TLS_DIR/server.key" && -f "$TLS_DIR/ca.crt" ]] \
    || die "--tls-dir needs ca.crt, server.crt and server.key"
  cat "$TLS_DIR/server.key" "$TLS_DIR/server.crt" >"$data_dir/keystore.pem"
  chmod 600 "$data_dir/keystore.pem"
  local jaas="org.apache.kafka.common.security.plain.PlainLoginModule required" user
  for user in "${PLAIN_USERS[@]}"; do jaas+=" user_${user%%:*}=\"${user#*:}\""; done
  cat <<PROPS
listeners=PLAINTEXT://127.0.0.1:$port,SASL_SSL://127.0.0.1:$SASL_SSL_PORT,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port,SASL_SSL://127.0.0.1:$SASL_SSL_PORT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL
sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-512
listener.name.sasl_ssl.plain.sasl.jaas.config=$jaas;
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
ssl.keystore.type=PEM
ssl.keystore.location=$data_dir/keystore.pem
ssl.truststore.type=PEM
ssl.truststore.location=$TLS_DIR/ca.crt
PROPS
}

# Extra `kafka-storage format` arguments: one --add-scram per SCRAM user.
security_format_args() {
  local user
  for user in "${SCRAM_USERS[@]}"; do
    printf '%s\n' --add-scram "SCRAM-SHA-512=[name=${user%%:*},password=${user#*:}]"
  done
}

running() {
  local pid_file="$1/kafka.pid"
  [[ -f "$pid_file" ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null
}

start() {
  local data_dir="" port=9092 cport="" heap="512m" timeout=90
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --data-dir) data_dir="$2"; shift 2 ;;
      --port) port="$2"; shift 2 ;;
      --controller-port) cport="$2"; shift 2 ;;
      --heap) heap="$2"; shift 2 ;;
      --timeout) timeout="$2"; shift 2 ;;
      --sasl-ssl-port|--tls-dir|--plain-user|--scram-user) security_option "$1" "$2"; shift 2 ;;
      *) die "unknown option $1" ;;
    esac
  done
  [[ -n "$data_dir" ]] || die "--data-dir is required"
  fetch
  mkdir -p "$data_dir/logs" "$data_dir/data"
  data_dir="$(cd "$data_dir" && pwd)"
  # The controller port is part of the formatted quorum: storage formatted with one cannot start
  # with another. Reuse the stored one; never reformat (that would delete every topic) on our own.
  local stored_cport="" formatted=""
  [[ -f "$data_dir/controller.port" ]] && stored_cport="$(cat "$data_dir/controller.port")"
  [[ -f "$data_dir/data/meta.properties" ]] && formatted=1
  if [[ -n "$formatted" ]]; then
    if [[ -z "$stored_cport" ]]; then
      [[ -n "$cport" ]] || die "$data_dir holds Kafka data but no controller.port: start it with the"         "--controller-port it was formatted with (or delete $data_dir/data to start empty, losing every topic)"
      echo "$cport" >"$data_dir/controller.port"
      stored_cport="$cport"
    elif [[ -n "$cport" && "$cport" != "$stored_cport" ]]; then
      die "$data_dir was formatted with controller port $stored_cport, not $cport: start it with"         "--controller-port $stored_cport (or without the option), or delete $data_dir/data to start empty"         "(this loses every topic)"
    fi
    cport="$stored_cport"
  fi
  [[ -n "$cport" ]] || cport="$(free_port)"
  if running "$data_dir"; then die "already running in $data_dir (pid $(cat "$data_dir/kafka.pid"))"; fi
  if port_open "$port"; then die "port $port is already in use"; fi

  cat >"$data_dir/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$data_dir/data
num.partitions=3
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=3
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
PROPS
  security_properties "$data_dir" "$port" "$cport" >>"$data_dir/server.properties"
  cat >"$data_dir/log4j2.properties" <<PROPS
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = $data_dir/logs/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
PROPS
  if [[ -z "$formatted" ]]; then
    local cluster_id
    cluster_id="$("$JAVA" -cp "$LIBS/*" kafka.tools.StorageTool random-uuid)"
    local -a extra=()
    mapfile -t extra < <(security_format_args)
    "$JAVA" -cp "$LIBS/*" kafka.tools.StorageTool format --standalone -t "$cluster_id" \
      -c "$data_dir/server.properties" "${extra[@]}" >"$data_dir/logs/format.log" 2>&1 \
      || { cat "$data_dir/logs/format.log" >&2; die "storage format failed"; }
    echo "$cport" >"$data_dir/controller.port"
  fi
  : >"$data_dir/logs/server.log"
  nohup "$JAVA" -Xms128m "-Xmx$heap" -XX:+UseG1GC -Djava.awt.headless=true \
    "-Dlog4j2.configurationFile=$data_dir/log4j2.properties" "-Dkafka.logs.dir=$data_dir/logs" \
    -cp "$LIBS/*" kafka.Kafka "$data_dir/server.properties" >"$data_dir/logs/stdout.log" 2>&1 &
  echo $! >"$data_dir/kafka.pid"
  echo "$port" >"$data_dir/port"

  local waited=0
  until grep -q "Kafka Server started" "$data_dir/logs/server.log" 2>/dev/null && port_open "$port"; do
    if ! running "$data_dir"; then
      tail -n 30 "$data_dir/logs/stdout.log" "$data_dir/logs/server.log" >&2 || true
      die "broker exited during start-up"
    fi
    if (( waited >= timeout * 5 )); then stop --data-dir "$data_dir"; die "broker not ready after ${timeout}s"; fi
    sleep 0.2; waited=$((waited + 1))
  done
  echo "127.0.0.1:$port"
}

stop() {
  local data_dir=""
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --data-dir) data_dir="$2"; shift 2 ;;
      *) die "unknown option $1" ;;
    esac
  done
  [[ -n "$data_dir" ]] || die "--data-dir is required"
  running "$data_dir" || { rm -f "$data_dir/kafka.pid"; return 0; }
  local pid; pid="$(cat "$data_dir/kafka.pid")"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then echo "kafka.sh: broker did not stop in 30s; killing" >&2; kill -KILL "$pid" || true; fi
  rm -f "$data_dir/kafka.pid"
}

status() {
  local data_dir=""
  while [[ $# -gt 0 ]]; do
    case "$1" in --data-dir) data_dir="$2"; shift 2 ;; *) die "unknown option $1" ;; esac
  done
  running "$data_dir" && port_open "$(cat "$data_dir/port")"
}

cmd="${1:-}"; shift || true
case "$cmd" in
  fetch) fetch ;;
  start) start "$@" ;;
  stop) stop "$@" ;;
  status) status "$@" ;;
  *) sed -n '2,12p' "$0"; exit 2 ;;
esac
