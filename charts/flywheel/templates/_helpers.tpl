{{/* Chart name, truncated to the 63-character DNS label limit. */}}
{{- define "flywheel.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-scoped name prefix. */}}
{{- define "flywheel.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The four service components, in loop order. */}}
{{- define "flywheel.components" -}}
policy reward preference trainer
{{- end -}}

{{/* Resource name of a component: dict "root" $ "name" "reward". */}}
{{- define "flywheel.componentName" -}}
{{- printf "%s-%s" (include "flywheel.fullname" .root | trunc 50 | trimSuffix "-") .name -}}
{{- end -}}

{{- define "flywheel.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Standard labels: dict "root" $ "name" <component>. */}}
{{- define "flywheel.labels" -}}
helm.sh/chart: {{ include "flywheel.chart" .root }}
{{ include "flywheel.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: flywheel
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "flywheel.selectorLabels" -}}
app.kubernetes.io/name: {{ include "flywheel.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .name }}
{{- end -}}

{{/* Image reference of a component: dict "root" $ "name" <component> "c" <component values>. */}}
{{- define "flywheel.image" -}}
{{- $repo := .c.image.repository | default (printf "%s-%s" .root.Values.image.repository .name) -}}
{{- $tag := .c.image.tag | default .root.Values.image.tag | default .root.Chart.AppVersion -}}
{{- if gt (int (.c.gpus | default 0)) 0 }}{{ $tag = printf "%s%s" $tag .root.Values.gpu.imageTagSuffix }}{{ end -}}
{{- if .c.image.digest -}}
{{- printf "%s@%s" $repo .c.image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}
{{- end -}}

{{/* Fully qualified gRPC service name used for readiness: "reward" -> flywheel.v1.RewardService. */}}
{{- define "flywheel.grpcService" -}}
{{- printf "flywheel.v1.%sService" (title .) -}}
{{- end -}}

{{/* Kafka bootstrap servers the services use. */}}
{{- define "flywheel.kafkaBootstrap" -}}
{{- if .Values.kafka.internal.enabled -}}
{{- /* Fully qualified: KEDA's operator resolves it from its own namespace, and it is the name the
     broker advertises (and its certificate carries under SASL_SSL). */ -}}
{{- printf "%s-kafka.%s.svc:9092" (include "flywheel.fullname" .) .Release.Namespace -}}
{{- else -}}
{{- required "kafka.bootstrapServers is required when kafka.internal.enabled is false" .Values.kafka.bootstrapServers -}}
{{- end -}}
{{- end -}}

{{/* Replication factor: the in-chart broker is a single node. */}}
{{- define "flywheel.kafkaReplication" -}}
{{- if .Values.kafka.internal.enabled -}}1{{- else -}}{{ .Values.kafka.replicationFactor }}{{- end -}}
{{- end -}}

{{/* Setting key -> environment variable name (pydantic-settings, prefix FLYWHEEL_). */}}
{{- define "flywheel.envName" -}}
{{- printf "FLYWHEEL_%s" (upper .) -}}
{{- end -}}

{{- define "flywheel.serviceAccountName" -}}
{{- if .root.Values.serviceAccount.create -}}
{{- include "flywheel.componentName" . -}}
{{- else -}}
default
{{- end -}}
{{- end -}}

{{/* A setting value as an environment string: maps/lists as JSON (pydantic-settings parses
     complex types from JSON), whole numbers without exponent (YAML numbers arrive as float64). */}}
{{- define "flywheel.settingValue" -}}
{{- if or (kindIs "map" .) (kindIs "slice" .) -}}
{{- toJson . -}}
{{- else if and (kindIs "float64" .) (eq . (floor .)) -}}
{{- int64 . -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end -}}

{{/* The ConfigMap data of a component (FLYWHEEL_* variables): dict "root" $ "name" <component> "c" <values>.
     Chart-managed settings win over user config: they must agree with ports, volumes and Kafka.
     Precedence: managed > <component>.config > config. */}}
{{- define "flywheel.configData" -}}
{{- $root := .root -}}
{{- $c := .c -}}
{{- $managed := dict
      "grpc_port" $c.grpcPort
      "metrics_port" $c.metricsPort
      "host" "0.0.0.0"
      "home" "/var/lib/flywheel"
      "kafka_bootstrap_servers" (include "flywheel.kafkaBootstrap" $root)
      "kafka_security_protocol" $root.Values.kafka.securityProtocol
      "kafka_sasl_mechanism" $root.Values.kafka.sasl.mechanism
      "kafka_ssl_check_hostname" $root.Values.kafka.tls.checkHostname
      "kafka_topic_partitions" $root.Values.kafka.topicPartitions
      "kafka_replication_factor" (include "flywheel.kafkaReplication" $root)
      "shutdown_grace_s" (sub $c.terminationGracePeriodSeconds 10 | max 1)
-}}
{{- range $c.extraPorts }}
{{- if .setting }}{{- $_ := set $managed .setting .port }}{{- end }}
{{- end }}
{{- if $root.Values.tls.enabled }}
{{- $_ := set $managed "tls_cert_file" "/etc/flywheel/tls/tls.crt" }}
{{- $_ := set $managed "tls_key_file" "/etc/flywheel/tls/tls.key" }}
{{- $_ := set $managed "tls_ca_file" "/etc/flywheel/tls/ca.crt" }}
{{- if $root.Values.tls.mutual }}
{{- $_ := set $managed "tls_client_ca_file" "/etc/flywheel/tls/ca.crt" }}
{{- end }}
{{- end }}
{{- if include "flywheel.kafkaCaSecret" $root }}
{{- $_ := set $managed "kafka_ssl_cafile" "/etc/flywheel/kafka-tls/ca.crt" }}
{{- end }}
{{- if and $root.Values.checkpoints.shared.enabled (eq .name "trainer") }}
{{- $_ := set $managed "trainer_checkpoint_uri" "file:///var/lib/flywheel/shared/checkpoints/policy" }}
{{- $_ := set $managed "trainer_reward_output_dir" "/var/lib/flywheel/shared/checkpoints/reward" }}
{{- end }}
{{- $settings := merge (dict) $managed (deepCopy ($c.config | default dict)) (deepCopy ($root.Values.config | default dict)) (include "flywheel.checkpointLocations" . | fromJson) -}}
{{- range $key := keys $settings | sortAlpha }}
{{- $value := index $settings $key }}
{{- if not (regexMatch "^[a-z][a-z0-9_]*$" $key) }}
{{- fail (printf "%s.config: %q is not a setting name (lower_snake_case)" $.name $key) }}
{{- end }}
{{- if not (kindIs "invalid" $value) }}
{{ include "flywheel.envName" $key }}: {{ include "flywheel.settingValue" $value | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Where policy and reward may load the versions announced on the model-versions topic from (JSON;
     user config wins): the shared volume the chart's trainer writes to, else the location the trainer
     is configured to write to (a local path, or an object store's scheme://host). Empty: the service
     default, <home>/checkpoints. */}}
{{- define "flywheel.checkpointLocations" -}}
{{- $root := .root -}}
{{- $derived := dict -}}
{{- if has .name (list "policy" "reward") -}}
{{- $trainer := merge (dict) (deepCopy ($root.Values.trainer.config | default dict)) (deepCopy ($root.Values.config | default dict)) -}}
{{- $roots := list -}}
{{- $remote := list -}}
{{- if $root.Values.checkpoints.shared.enabled -}}
{{- $roots = append $roots "/var/lib/flywheel/shared/checkpoints" -}}
{{- else -}}
{{- with $trainer.trainer_checkpoint_uri -}}
{{- $uri := urlParse . -}}
{{- if has $uri.scheme (list "" "file") -}}
{{- $roots = append $roots $uri.path -}}
{{- else -}}
{{- $remote = append $remote (printf "%s://%s" $uri.scheme (regexReplaceAll ":[0-9]+$" $uri.host "") | lower) -}}
{{- end -}}
{{- end -}}
{{- with $trainer.trainer_reward_output_dir -}}
{{- $roots = append $roots . -}}
{{- end -}}
{{- end -}}
{{- if $roots }}{{ $_ := set $derived "checkpoint_roots" $roots }}{{ end -}}
{{- if $remote }}{{ $_ := set $derived "checkpoint_remote" $remote }}{{ end -}}
{{- end -}}
{{- toJson $derived -}}
{{- end -}}

{{/* Workload annotations recording the security-scan decisions (checkov skip annotations need a
     reason): dict "digest" <image digest or ""> "pullPolicy" <policy> ["secretEnv" <Secrets as env>]. */}}
{{- define "flywheel.scanAnnotations" -}}
{{- if ne .pullPolicy "Always" }}
checkov.io/skip1: CKV_K8S_15=Images are immutable release tags or digests; Always would re-contact the registry for multi-GB images on every pod start
{{- end }}
{{- if not .digest }}
checkov.io/skip2: CKV_K8S_43=Pinned by release tag because no digest was configured; set <component>.image.digest to pin by digest
{{- end }}
{{- if .secretEnv }}
checkov.io/skip3: CKV_K8S_35=Settings are read from the environment (pydantic-settings); the Secret values reach only this container's environment, never a ConfigMap or the image
{{- end }}
{{- end -}}


{{/* Secret with the services' TLS certificate (tls.crt, tls.key, ca.crt). */}}
{{- define "flywheel.tlsSecret" -}}
{{- .Values.tls.secretName | default (printf "%s-tls" (include "flywheel.fullname" .)) -}}
{{- end -}}

{{/* Secret whose ca.crt clients trust for the brokers ("" when none is configured). */}}
{{- define "flywheel.kafkaCaSecret" -}}
{{- if has .Values.kafka.securityProtocol (list "SSL" "SASL_SSL") -}}
{{- if .Values.kafka.tls.caSecret -}}
{{- .Values.kafka.tls.caSecret -}}
{{- else if and .Values.kafka.internal.enabled (eq .Values.kafka.securityProtocol "SASL_SSL") -}}
{{- required "kafka.internal.tlsSecret is required for the in-chart broker with SASL_SSL" .Values.kafka.internal.tlsSecret -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "true" when the Kafka clients authenticate with SASL. */}}
{{- define "flywheel.kafkaSasl" -}}
{{- if hasPrefix "SASL_" .Values.kafka.securityProtocol -}}
{{- $_ := required "kafka.sasl.existingSecret (keys username, password) is required with a SASL_* kafka.securityProtocol" .Values.kafka.sasl.existingSecret -}}
true
{{- end -}}
{{- end -}}

{{/* The trainer runs under torchrun (several processes or pods): dict "root" $ "name" <component> "c" <values>. */}}
{{- define "flywheel.torchrun" -}}
{{- if and (eq .name "trainer") (or (gt (int .c.distributed.nodes) 1) (gt (int .c.distributed.procsPerNode) 1)) -}}
true
{{- end -}}
{{- end -}}

{{/* Most replicas a Kafka consumer component may run: one per partition of its input topic. */}}
{{- define "flywheel.checkPartitions" -}}
{{- $partitions := int .root.Values.kafka.topicPartitions -}}
{{- range $what, $n := .counts -}}
{{- if gt (int $n) $partitions -}}
{{- fail (printf "%s: %s=%d exceeds kafka.topicPartitions=%d (each replica consumes at least one partition; extra replicas idle)" $.name $what (int $n) $partitions) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* One probe: dict "ctx" <component ctx> "service" <health name> "timing" <probe values>. Native gRPC
     probes in plaintext; with TLS (the kubelet's gRPC probe speaks plaintext only) or on the
     ranks of a multi-pod trainer (only pod 0 serves) the image's health-check script. */}}
{{- define "flywheel.probe" -}}
{{- $ctx := .ctx -}}
{{- $root := $ctx.root -}}
{{- if or $root.Values.tls.enabled (include "flywheel.torchrun" $ctx) }}
{{- $check := printf "python /opt/flywheel/bin/grpc_health_check.py --service %s" (.service | quote) -}}
{{- if $root.Values.tls.enabled }}
{{- $check = printf "%s --server-name %s.%s.svc" $check (include "flywheel.componentName" $ctx) $root.Release.Namespace -}}
{{- end }}
exec:
  command:
    - /bin/sh
    - -c
    {{- if include "flywheel.torchrun" $ctx }}
    # Pod 0 runs the service; the other pods' health is torchrun's (it exits when a rank fails).
    - {{ printf "[ \"${HOSTNAME##*-}\" != 0 ] || exec %s" $check | quote }}
    {{- else }}
    - {{ printf "exec %s" $check | quote }}
    {{- end }}
periodSeconds: {{ .timing.periodSeconds }}
failureThreshold: {{ .timing.failureThreshold }}
# A Python process start (imports, TLS handshake) needs more than a native probe.
timeoutSeconds: {{ max 10 .timing.timeoutSeconds }}
{{- else }}
grpc:
  port: {{ $ctx.c.grpcPort }}
  service: {{ .service }}
periodSeconds: {{ .timing.periodSeconds }}
failureThreshold: {{ .timing.failureThreshold }}
timeoutSeconds: {{ .timing.timeoutSeconds }}
{{- end }}
{{- end -}}
