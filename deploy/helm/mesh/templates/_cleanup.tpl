{{/* Name of the per-node cleanup DaemonSet the pre-delete hook runs. */}}
{{- define "mesh.cleanupName" -}}
{{- printf "%s-cleanup" (include "mesh.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The cleanup DaemonSet, as deploy/kubernetes/cleanup/cleanup-daemonset.yaml (whose comments give
the reasons): an init container runs `mesh-agent cleanup` once per node, a pause container then
holds the pod ready so `kubectl rollout status` tells when every node is clean.
*/}}
{{- define "mesh.cleanupDaemonSet" -}}
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: {{ include "mesh.cleanupName" . }}
  namespace: {{ .Release.Namespace }}
  labels:
    app.kubernetes.io/name: mesh-cleanup
    app.kubernetes.io/instance: {{ .Release.Name }}
    app.kubernetes.io/part-of: mesh
spec:
  selector:
    matchLabels:
      app.kubernetes.io/name: mesh-cleanup
      app.kubernetes.io/instance: {{ .Release.Name }}
  template:
    metadata:
      labels:
        app.kubernetes.io/name: mesh-cleanup
        app.kubernetes.io/instance: {{ .Release.Name }}
        app.kubernetes.io/part-of: mesh
    spec:
      {{- with .Values.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      priorityClassName: {{ .Values.priorityClassName }}
      automountServiceAccountToken: false
      {{- with .Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      initContainers:
        - name: cleanup
          image: {{ include "mesh.image" . }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          command: ["/usr/local/bin/mesh-agent"]
          args:
            - cleanup
            - --pin-dir
            - /sys/fs/bpf/mesh
            - --cgroup
            - /sys/fs/cgroup
            - --admin-socket
            - /run/mesh/admin.sock
          securityContext:
            privileged: false
            capabilities:
              drop: ["ALL"]
              add:
                - BPF
                - NET_ADMIN
                - SYS_ADMIN
            runAsUser: 0
            runAsNonRoot: false
            readOnlyRootFilesystem: true
            allowPrivilegeEscalation: false
            seccompProfile:
              type: RuntimeDefault
          volumeMounts:
            - name: bpffs
              mountPath: /sys/fs/bpf
              mountPropagation: HostToContainer
            - name: cgroup
              mountPath: /sys/fs/cgroup
              readOnly: true
            - name: run-mesh
              mountPath: /run/mesh
      containers:
        - name: done
          image: {{ .Values.cleanup.pauseImage }}
          imagePullPolicy: IfNotPresent
          resources:
            requests:
              cpu: 1m
              memory: 8Mi
            limits:
              memory: 16Mi
          securityContext:
            capabilities:
              drop: ["ALL"]
            runAsUser: 65535
            runAsNonRoot: true
            readOnlyRootFilesystem: true
            allowPrivilegeEscalation: false
            seccompProfile:
              type: RuntimeDefault
      volumes:
        - name: bpffs
          hostPath:
            path: /sys/fs/bpf
            type: Directory
        - name: cgroup
          hostPath:
            path: {{ .Values.host.cgroupPath }}
            type: Directory
        - name: run-mesh
          hostPath:
            path: /run/mesh
            type: DirectoryOrCreate
{{- end -}}
