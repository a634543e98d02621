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
      args: ["serve", {{ $name | quote }}]
      envFrom:
        - configMapRef:
            name: {{ include "flywheel.componentName" . }}
      env:
        - name: FLYWHEEL_KAFKA_CLIENT_ID
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
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
      # Native gRPC probes (grpc.health.v1). Startup and liveness ask about the server as a
      # whole; readiness asks about this service, which reports NOT_SERVING while loading models
      # and during graceful shutdown.
      startupProbe:
        grpc:
          port: {{ $c.grpcPort }}
        periodSeconds: {{ $c.probes.startup.periodSeconds }}
        failureThreshold: {{ $c.probes.startup.failureThreshold }}
        timeoutSeconds: {{ $c.probes.startup.timeoutSeconds }}
      livenessProbe:
        grpc:
          port: {{ $c.grpcPort }}
        periodSeconds: {{ $c.probes.liveness.periodSeconds }}
        failureThreshold: {{ $c.probes.liveness.failureThreshold }}
        timeoutSeconds: {{ $c.probes.liveness.timeoutSeconds }}
      readinessProbe:
        grpc:
          port: {{ $c.grpcPort }}
          service: {{ include "flywheel.grpcService" $name }}
        periodSeconds: {{ $c.probes.readiness.periodSeconds }}
        failureThreshold: {{ $c.probes.readiness.failureThreshold }}
        timeoutSeconds: {{ $c.probes.readiness.timeoutSeconds }}
      resources:
        {{- toYaml $c.resources | nindent 8 }}
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
    {{- if and $root.Values.checkpoints.shared.enabled (has $name (list "policy" "reward" "trainer")) }}
    - name: checkpoints
      persistentVolumeClaim:
        claimName: {{ $root.Values.checkpoints.shared.existingClaim | default (printf "%s-checkpoints" (include "flywheel.fullname" $root)) }}
        readOnly: {{ ne $name "trainer" }}
    {{- end }}
  {{- with $c.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $c.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $c.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $c.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
