"""Every manifest the labs apply validates against the real Kubernetes JSON schemas of the version
kind's pinned node image runs (kubernetes-validate, strict: unknown fields are errors); custom
resources validate against their CustomResourceDefinition's schema. The notebooks apply only these."""
import copy
import json
import re

import jsonschema
import kubernetes_validate
import pytest
import yaml

from helpers import cluster, kind, labs, operator

FILES = sorted(cluster.MANIFESTS.rglob("*.y*ml"))
DOCS = [(path, doc) for path in FILES for doc in yaml.safe_load_all(path.read_text()) if doc]
CRDS = {(f"{d['spec']['group']}/{v['name']}", d["spec"]["names"]["kind"]): v["schema"]["openAPIV3Schema"]
        for _, d in DOCS if d["kind"] == "CustomResourceDefinition" for v in d["spec"]["versions"]}
KUBE_LABS = [lab for lab in labs.all_labs() if "kind" in lab.requires]


def _strict(schema):
    """A structural schema as the API server applies it with fieldValidation=Strict: no unknown fields."""
    schema = copy.deepcopy(schema)
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        schema.setdefault("additionalProperties", False)
    for sub in schema.get("properties", {}).values():
        sub.update(_strict(sub))
    if "items" in schema:
        schema["items"] = _strict(schema["items"])
    return schema


def validate(obj):
    """Raise if the pinned Kubernetes version would refuse ``obj``."""
    key = (obj["apiVersion"], obj["kind"])
    if key in CRDS:
        schema = _strict(CRDS[key])
        schema["properties"].update(apiVersion={"type": "string"}, kind={"type": "string"}, metadata={"type": "object"})
        jsonschema.Draft4Validator(schema).validate(obj)
    else:
        kubernetes_validate.validate(obj, kind.KUBERNETES_VERSION, strict=True)


def test_the_manifests_are_there():
    assert {p.parent.name for p in FILES} == {"41-cluster", "42-pods", "43-workloads", "44-controller",
                                              "45-services", "46-declarative"}


@pytest.mark.parametrize("path, obj", DOCS, ids=[f"{p.parent.name}/{p.name}:{d['kind']}" for p, d in DOCS])
def test_manifest_validates_against_the_pinned_kubernetes(path, obj):
    validate(obj)
    assert cluster.load(obj) == [obj]  # and the helpers read it


def test_the_validator_really_runs():
    pod = yaml.safe_load((cluster.MANIFESTS / "42-pods/single.yaml").read_text())
    unknown = copy.deepcopy(pod)
    unknown["spec"]["containers"][0]["imagePullPolicy "] = "Never"  # a stray space: an unknown field
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePullPolicy "):
        validate(unknown)
    wrong = copy.deepcopy(pod)
    wrong["spec"]["containers"][0]["ports"][0]["containerPort"] = "8080"
    with pytest.raises(kubernetes_validate.ValidationError, match="'8080' is not of type 'integer'"):
        validate(wrong)
    echo = yaml.safe_load((cluster.MANIFESTS / "44-controller/hello.yaml").read_text())
    echo["spec"]["replicas"] = 9
    with pytest.raises(jsonschema.ValidationError, match="9 is greater than the maximum of 5"):
        validate(echo)
    echo["spec"] = {"message": "hi", "replica": 2}
    with pytest.raises(jsonschema.ValidationError, match="'replica' was unexpected"):
        validate(echo)


def test_what_the_helpers_build_validates_too():
    echo = yaml.safe_load((cluster.MANIFESTS / "44-controller/hello.yaml").read_text())
    echo["metadata"].update(namespace="cnlab-controller", uid="0f3a9a4e-0000-4000-8000-000000000000")
    validate(operator.echo_deployment(echo))
    validate({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "cnlab-lab", "labels": {"cnlab": "course"}}})
    validate(cluster.node_pod("cnlab-pods-worker", "cnlab-pods"))


def test_the_articles_half_a_core_and_512m_is_a_guaranteed_pod():
    for name in ("half", "hog"):
        [pod] = cluster.load(f"42-pods/{name}.yaml")
        [res] = [c["resources"] for c in pod["spec"]["containers"]]
        assert res["requests"] == res["limits"] == {"cpu": "500m", "memory": "512Mi"}, name  # QoS Guaranteed


def test_no_manifest_assumes_kind():
    """On any cluster: no fixed nodePort to collide on, no kind-only StorageClass, no kind node names."""
    for path, obj in DOCS:
        text = json.dumps(obj)
        assert '"nodePort"' not in text and '"storageClassName"' not in text and "-worker" not in text, path


def test_workloads_use_the_course_images_and_never_pull():
    """No registry is reachable from a lab machine: every image is built locally and loaded into the nodes."""
    def containers(obj):
        spec = obj.get("spec", {})
        spec = spec.get("jobTemplate", {}).get("spec", spec)
        return spec.get("template", {}).get("spec", spec).get("containers", [])
    found = [c for _, d in DOCS for c in containers(d)]
    assert found and all(c["image"].startswith("cnlab/busybox:") and c["imagePullPolicy"] == "Never" for c in found)


@pytest.mark.parametrize("lab", KUBE_LABS, ids=lambda lab: lab.name)
def test_notebooks_apply_only_manifest_files_that_exist(lab):
    nb = json.loads(lab.path.read_text())
    assert nb["metadata"]["cnlab"] == {"requires": ["kind"], "nbval": "lax"}
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert "apiVersion:" not in code and "kind: " not in code  # no inline YAML
    for ref in re.findall(r"""["'](\d\d-[a-z-]+/[\w.-]+\.yaml)["']""", code):
        assert (cluster.MANIFESTS / ref).is_file(), ref


def test_there_are_six_kubernetes_labs():
    assert [lab.name for lab in KUBE_LABS] == ["41-kind-cluster", "42-pods", "43-workloads", "44-k8s-controller",
                                               "45-services", "46-declarative"]
