"""The fields of KubeRay 1.7.0's RayCluster and RayJob (apiVersion ray.io/v1), as a JSON schema.

Written from the operator's CRDs and Go types at tag v1.7.0: the API server prunes unknown
fields silently (no `x-kubernetes-preserve-unknown-fields` anywhere), so a misspelt or
misplaced key in the chart would vanish without an error; here it fails a test. Pod
templates are checked separately, against Kubernetes' own PodTemplateSpec schema.
"""

from __future__ import annotations

from typing import Any

KUBERAY_VERSION = "1.7.0"
POD_TEMPLATE = {"type": "object", "required": ["spec"]}  # checked by kubernetes-validate
STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
INT = {"type": "integer", "minimum": 0}


def closed(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
        "required": list(required),
    }


AUTOSCALER_OPTIONS = closed(
    {
        "resources": {"type": "object"},
        "image": {"type": "string"},
        "imagePullPolicy": {"type": "string"},
        "securityContext": {"type": "object"},
        "idleTimeoutSeconds": INT,
        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
        "version": {"enum": ["v1", "v2"]},
        "env": {"type": "array"},
        "envFrom": {"type": "array"},
        "volumeMounts": {"type": "array"},
        "command": {"type": "array", "items": {"type": "string"}},
        "args": {"type": "array", "items": {"type": "string"}},
    }
)

HEAD_GROUP = closed(
    {
        "template": POD_TEMPLATE,
        "headService": {"type": "object"},
        "enableIngress": {"type": "boolean"},
        "ingressOptions": {"type": "object"},
        "resources": STRINGS,
        "labels": STRINGS,
        "rayStartParams": STRINGS,
        "serviceType": {"type": "string"},
    },
    required=("template",),
)

WORKER_GROUP = closed(
    {
        "suspend": {"type": "boolean"},
        "groupName": {"type": "string", "minLength": 1},
        "replicas": INT,
        "minReplicas": INT,
        "maxReplicas": INT,
        "idleTimeoutSeconds": INT,
        "priority": {"type": "integer"},
        "resources": STRINGS,
        "labels": STRINGS,
        "rayStartParams": STRINGS,
        "template": POD_TEMPLATE,
        "scaleStrategy": closed({"workersToDelete": {"type": "array"}}),
        "numOfHosts": {"type": "integer", "minimum": 1},
    },
    required=("groupName", "minReplicas", "maxReplicas", "template"),
)

RAY_CLUSTER_SPEC = closed(
    {
        "upgradeStrategy": closed({"type": {"enum": ["Recreate", "None"]}}),
        "authOptions": closed(
            {
                "mode": {"enum": ["disabled", "token"]},
                "secretName": {"type": "string"},
                "enableK8sTokenAuth": {"type": "boolean"},
            }
        ),
        "suspend": {"type": "boolean"},
        "managedBy": {"enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]},
        "autoscalerOptions": AUTOSCALER_OPTIONS,
        "headServiceAnnotations": STRINGS,
        "enableInTreeAutoscaling": {"type": "boolean"},
        "gcsFaultToleranceOptions": {"type": "object"},
        "historyServerOptions": {"type": "object"},
        "networkPolicy": {"type": "object"},
        "tlsOptions": closed({"enabled": {"type": "boolean"}}),
        "headGroupSpec": HEAD_GROUP,
        "rayVersion": {"type": "string"},
        "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP},
    },
    required=("headGroupSpec",),
)

RAY_JOB_SPEC = closed(
    {
        "activeDeadlineSeconds": INT,
        "backoffLimit": INT,
        "rayClusterSpec": RAY_CLUSTER_SPEC,
        "submitterPodTemplate": POD_TEMPLATE,
        "metadata": STRINGS,
        "clusterSelector": STRINGS,
        "submitterConfig": closed({"backoffLimit": INT}),
        "managedBy": {"enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]},
        "deletionStrategy": {"type": "object"},
        "entrypoint": {"type": "string"},
        "runtimeEnvYAML": {"type": "string"},
        "jobId": {"type": "string"},
        # No enum in the CRD; these are the operator's modes.
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
        "entrypointResources": {"type": "string"},
        "entrypointNumCpus": {"type": "number"},
        "entrypointNumGpus": {"type": "number"},
        "ttlSecondsAfterFinished": INT,
        "preRunningDeadlineSeconds": {"type": "integer", "minimum": 1},
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "suspend": {"type": "boolean"},
    }
)


def resource(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return closed(
        {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": kind},
            "metadata": {"type": "object", "required": ["name"]},
            "spec": spec,
        },
        required=("apiVersion", "kind", "metadata", "spec"),
    )


SCHEMAS = {
    "RayCluster": resource("RayCluster", RAY_CLUSTER_SPEC),
    "RayJob": resource("RayJob", RAY_JOB_SPEC),
}
# RayCluster names are DNS-1035 labels of at most 53 characters, RayJob names at most 47.
NAME_LIMITS = {"RayCluster": 53, "RayJob": 47}
