{{/* Kafka client identity and SASL credentials (from kafka.sasl.existingSecret) of a container: $. */}}
{{- define "flywheel.kafkaClientEnv" -}}
- name: FLYWHEEL_KAFKA_CLIENT_ID
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- if include "flywheel.kafkaSasl" . }}
- name: FLYWHEEL_KAFKA_SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ .Values.kafka.sasl.existingSecret }}
      key: username
- name: FLYWHEEL_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.kafka.sasl.existingSecret }}
      key: password
{{- end }}
{{- end -}}

{{/* Pod template of a service component: dict "root" $ "name" <component> "c" <values>. */}}
{{- define "flywheel.podTemplate" -}}
{{- $root := .root -}}
{{- $c := .c -}}
{{- $name := .name -}}
metadata:
  labels:
    {{- include "flywheel.labels" . | nindent 4 }}
    {{- with $c.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include "flywheel.configData" . | sha256sum }}
    {{- if include "flywheel.torchrun" . }}
    kubectl.kubernetes.io/default-container: {{ $name }}
    {{- end }}
    {{- with $c.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "flywheel.serviceAccountName" . }}
  automountServiceAccountToken: {{ $root.Values.serviceAccount.automountToken }}
  enableServiceLinks: false
  terminationGracePeriodSeconds: {{ $c.terminationGracePeriodSeconds }}
  {{- with $c.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  containers:
    - name: {{ $name }}
      image: {{ include "flywheel.image" . }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      {{- if include "flywheel.torchrun" . }}
      {{- $d := $c.distributed }}
      # One torchrun job over `distributed.nodes` pods: static rendezvous on pod 0 (node rank =
      # the pod's ordinal, so global rank 0, which runs the service, is always on pod 0).
      command: ["/bin/sh", "-ec"]
      args:
        - >-
          exec python -m torch.distributed.run
          --nnodes {{ $d.nodes }} --nproc-per-node {{ $d.procsPerNode }}
          --node-rank "${HOSTNAME##*-}"
          --master-addr {{ include "flywheel.componentName" . }}-0.{{ include "flywheel.componentName" . }}-ranks.{{ $root.Release.Namespace }}.svc
          --master-port {{ $d.port }}
          --max-restarts 0
          -m flywheel.trainer
      {{- else }}
      args: ["serve", {{ $name | quote }}]
      {{- end }}
      envFrom:
        - configMapRef:
            name: {{ include "flywheel.componentName" . }}
        {{- with $root.Values.auth.existingSecret }}
        - secretRef:
            name: {{ . }}
        {{- end }}
      env:
        {{- include "flywheel.kafkaClientEnv" $root | nindent 8 }}
        # Static group membership: a restarted pod keeps its partitions (no rebalance, no wait for
        # its old session); a pod that goes away for good releases them on SIGTERM or after
        # kafka_session_timeout_ms.
        - name: FLYWHEEL_KAFKA_GROUP_INSTANCE_ID
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        {{- with $root.Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- with $c.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        - name: grpc
          containerPort: {{ $c.grpcPort }}
          protocol: TCP
        - name: metrics
          containerPort: {{ $c.metricsPort }}
          protocol: TCP
        {{- range $c.extraPorts }}
        - name: {{ .name }}
          containerPort: {{ .port }}
          protocol: TCP
        {{- end }}
        {{- if include "flywheel.torchrun" . }}
        - name: rendezvous
          containerPort: {{ $c.distributed.port }}
          protocol: TCP
        {{- end }}
      # gRPC health probes. Startup and liveness ask about flywheel.liveness, SERVING from the
      # moment the server listens: a long start-up (model load, the preference replay) never
      # restarts the pod. Readiness asks about this service, which reports NOT_SERVING while it
      # loads or replays and during graceful shutdown.
      startupProbe:
        {{- include "flywheel.probe" (dict "ctx" . "service" "flywheel.liveness" "timing" $c.probes.startup) | nindent 8 }}
      livenessProbe:
        {{- include "flywheel.probe" (dict "ctx" . "service" "flywheel.liveness" "timing" $c.probes.liveness) | nindent 8 }}
      readinessProbe:
        {{- include "flywheel.probe" (dict "ctx" . "service" (include "flywheel.grpcService" $name) "timing" $c.probes.readiness) | nindent 8 }}
      {{- $resources := deepCopy $c.resources }}
      {{- if gt (int $c.gpus) 0 }}
      {{- $_ := set $resources.limits $root.Values.gpu.resourceName (int $c.gpus) }}
      {{- $_ := set $resources.requests $root.Values.gpu.resourceName (int $c.gpus) }}
      {{- end }}
      resources:
        {{- toYaml $resources | nindent 8 }}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: home
          mountPath: /var/lib/flywheel
        - name: tmp
          mountPath: /tmp
        {{- if and $root.Values.checkpoints.shared.enabled (has $name (list "policy" "reward" "trainer")) }}
        - name: checkpoints
          mountPath: /var/lib/flywheel/shared
          readOnly: {{ ne $name "trainer" }}
        {{- end }}
        {{- if $root.Values.tls.enabled }}
        - name: tls
          mountPath: /etc/flywheel/tls
          readOnly: true
        {{- end }}
        {{- if include "flywheel.kafkaCaSecret" $root }}
        - name: kafka-tls
          mountPath: /etc/flywheel/kafka-tls
          readOnly: true
        {{- end }}
        {{- if include "flywheel.torchrun" . }}
        - name: shm
          mountPath: /dev/shm
        {{- end }}
  volumes:
    {{- if and (eq $name "preference") $c.persistence.enabled }}
    - name: home
      persistentVolumeClaim:
        claimName: {{ include "flywheel.componentName" . }}
    {{- else if not (and (eq $name "trainer") $c.persistence.enabled) }}
    - name: home
      emptyDir: {}
    {{- end }}
    - name: tmp
      emptyDir:
        sizeLimit: 1Gi
    {{- if $root.Values.tls.enabled }}
    - name: tls
      secret:
        secretName: {{ include "flywheel.tlsSecret" $root }}
        defaultMode: 0440
    {{- end }}
    {{- with include "flywheel.kafkaCaSecret" $root }}
    - name: kafka-tls
      secret:
        secretName: {{ . }}
        items:
          - {key: ca.crt, path: ca.crt}
    {{- end }}
    {{- if include "flywheel.torchrun" . }}
    # Collective communication (gloo, NCCL) uses shared memory beyond the runtime's 64 MiB default.
    - name: shm
      emptyDir:
        medium: Memory
        sizeLimit: 2Gi
    {{- end }}
    {{- if and $root.Values.checkpoints.shared.enabled (has $name (list "policy" "reward" "trainer")) }}
    - name: checkpoints
      persistentVolumeClaim:
        claimName: {{ $root.Values.checkpoints.shared.existingClaim | default (printf "%s-checkpoints" (include "flywheel.fullname" $root)) }}
        readOnly: {{ ne $name "trainer" }}
    {{- end }}
  {{- $gpu := gt (int $c.gpus) 0 }}
  {{- $nodeSelector := $c.nodeSelector | default dict }}
  {{- if $gpu }}{{ $nodeSelector = merge (deepCopy $nodeSelector) $root.Values.gpu.nodeSelector }}{{ end }}
  {{- with $nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- $spread := $root.Values.scheduling.spreadByDefault }}
  {{- if $c.affinity }}
  affinity:
    {{- toYaml $c.affinity | nindent 4 }}
  {{- else if $spread }}
  # Default: replicas prefer different nodes (soft, so a small cluster still schedules them).
  affinity:
    podAntiAffinity:
      preferredDuringSchedulingIgnoredDuringExecution:
        - weight: 100
          podAffinityTerm:
            topologyKey: kubernetes.io/hostname
            labelSelector:
              matchLabels:
                {{- include "flywheel.selectorLabels" . | nindent 16 }}
  {{- end }}
  {{- $tolerations := $c.tolerations | default list }}
  {{- if $gpu }}{{ $tolerations = concat $tolerations $root.Values.gpu.tolerations }}{{ end }}
  {{- with $tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if $c.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml $c.topologySpreadConstraints | nindent 4 }}
  {{- else if $spread }}
  topologySpreadConstraints:
    - maxSkew: 1
      topologyKey: topology.kubernetes.io/zone
      whenUnsatisfiable: ScheduleAnyway
      labelSelector:
        matchLabels:
          {{- include "flywheel.selectorLabels" . | nindent 10 }}
  {{- end }}
{{- end -}}
