"""What Triton's own QA suites check, with models of our own (their code is not in this repository): scalar models
(qa/L0_scalar_io), optional inputs and the input-count words (qa/L0_input_validation), any bytes in BYTES tensors
(qa/L0_string_io), a shared-memory region unregistered while a request uses it (qa/L0_shared_memory), the queue
policy's timeout while the instance is busy (qa/L0_batcher/queue_timeout_test.py), and Triton's words where its
tests match on a message."""
from __future__ import annotations

import threading
import time

import numpy as np
import onnx
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
import tritonclient.utils.shared_memory as shm
from onnx import TensorProto, helper, numpy_helper
from tritonclient.utils import InferenceServerException

from tests.server.conftest import ServerProcess

pytestmark = pytest.mark.subprocess


def _save(repo, name: str, nodes, inputs, outputs, config: str, initializers=()) -> None:
    (repo / name / "1").mkdir(parents=True)
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=list(initializers))
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              str(repo / name / "1" / "model.onnx"))
    (repo / name / "config.pbtxt").write_text(f'name: "{name}"\nplatform: "onnxruntime_onnx"\n{config}')


def _vi(name: str, elem: int, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _slow_body(n: int = 256) -> onnx.GraphProto:
    return helper.make_graph(
        [helper.make_node("MatMul", ["m", "w"], ["m2"]), helper.make_node("Identity", ["cond"], ["cond_out"])], "body",
        [_vi("i", TensorProto.INT64, []), _vi("cond", TensorProto.BOOL, []), _vi("m", TensorProto.FLOAT, [n, n])],
        [_vi("cond_out", TensorProto.BOOL, []), _vi("m2", TensorProto.FLOAT, [n, n])])


def _slow_identity(repo, name: str, config: str, trips: int) -> None:
    """OUTPUT0 = INPUT0 after a Loop of ``trips`` 256x256 MatMuls (an execution that takes a while)."""
    n = 256
    inits = [numpy_helper.from_array(np.array(trips, np.int64), "trips"), numpy_helper.from_array(np.array(True), "c"),
             numpy_helper.from_array(np.eye(n, dtype=np.float32), "m0"),
             numpy_helper.from_array(np.eye(n, dtype=np.float32), "w"), numpy_helper.from_array(np.float32(0), "zero")]
    nodes = [helper.make_node("Loop", ["trips", "c", "m0"], ["mend"], body=_slow_body(n)),
             helper.make_node("ReduceMin", ["mend"], ["mn"], keepdims=0), helper.make_node("Mul", ["mn", "zero"], ["z"]),
             helper.make_node("Add", ["INPUT0", "z"], ["OUTPUT0"])]
    _save(repo, name, nodes, [_vi("INPUT0", TensorProto.FLOAT, ["b", "n"])], [_vi("OUTPUT0", TensorProto.FLOAT, ["b", "n"])],
          config, inits)


@pytest.fixture(scope="module")
def qa_server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("qa")
    f32, text = TensorProto.FLOAT, TensorProto.STRING
    # scalars: inputs and outputs without a shape, served with dims [1] / [1, 1] (Triton's gen_qa_ort_scalar_models)
    for dims in ("1", "1, 1"):
        name = f"scalar_{dims.count('1')}dim"
        _save(repo, name, [helper.make_node("Identity", ["INPUT"], ["OUTPUT"])], [_vi("INPUT", f32, None)],
              [_vi("OUTPUT", f32, None)], f'input [{{ name: "INPUT" data_type: TYPE_FP32 dims: [ {dims} ] }}]\n'
                                          f'output [{{ name: "OUTPUT" data_type: TYPE_FP32 dims: [ {dims} ] }}]\n')
    # optional inputs: an input with a default (an initializer listed among the graph's inputs)
    one = helper.make_node("Constant", [], ["OUTPUT0"], value=numpy_helper.from_array(np.ones(1, np.float32)))
    for name, optional in (("all_required", ()), ("one_optional", ("INPUT3",)),
                           ("all_optional", ("INPUT0", "INPUT1", "INPUT2"))):
        count = 4 if optional == ("INPUT3",) else 3
        cfg = "".join(f'input {{ name: "INPUT{i}" data_type: TYPE_FP32 dims: [ -1 ]'
                      f'{" optional: true" if f"INPUT{i}" in optional else ""} }}\n' for i in range(count))
        _save(repo, name, [one], [_vi(f"INPUT{i}", f32, ["n"]) for i in range(count)], [_vi("OUTPUT0", f32, [1])],
              cfg + 'output { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 1 ] }\n',
              [numpy_helper.from_array(np.zeros(1, np.float32), o) for o in optional])
    # strings: one model only moves them (any bytes), one reads them as text (UTF-8 only)
    strings = 'max_batch_size: 8\ninput { name: "INPUT0" data_type: TYPE_STRING dims: [ -1 ] }\n' \
              'output { name: "OUTPUT0" data_type: TYPE_STRING dims: [ -1 ] }\n'
    _save(repo, "moves_strings", [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
          [_vi("INPUT0", text, ["b", "n"])], [_vi("OUTPUT0", text, ["b", "n"])], strings)
    _save(repo, "reads_strings", [helper.make_node("StringNormalizer", ["INPUT0"], ["OUTPUT0"], case_change_action="LOWER", locale="C.UTF-8")],
          [_vi("INPUT0", text, [1, "n"])], [_vi("OUTPUT0", text, [1, "n"])], strings.replace("8", "1"))
    # a batch window long enough to unregister a region while the request waits in it
    _save(repo, "windowed", [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])], [_vi("INPUT0", f32, ["b", 4])],
          [_vi("OUTPUT0", f32, ["b", 4])],
          'max_batch_size: 8\ninput { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] }\n'
          'output { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] }\n'
          'dynamic_batching { max_queue_delay_microseconds: 3000000 }\n')
    # one instance, a long execution, a 0.5 s queue timeout (qa/L0_batcher's dynamic_batch model)
    _slow_identity(repo, "busy", 'max_batch_size: 1\ninstance_group { count: 1 }\ndynamic_batching { '
                   'default_queue_policy { timeout_action: REJECT default_timeout_microseconds: 500000 '
                   'max_queue_size: 8 } }\n', trips=12000)
    with ServerProcess(repo, "--allow-unverified", "--no-warmup", "--repository-api") as srv:
        yield srv


def _grpc(srv):
    return tgrpc.InferenceServerClient(srv.grpc)


def _input(mod, name: str, arr: np.ndarray, datatype: str):
    inp = mod.InferInput(name, list(arr.shape), datatype)
    inp.set_data_from_numpy(arr)
    return inp


def test_scalar_models_are_served_with_one_element_dims(qa_server):
    client = _grpc(qa_server)
    for name, x in (("scalar_1dim", np.array([3.5], np.float32)), ("scalar_2dim", np.array([[3.5]], np.float32))):
        out = client.infer(name, [_input(tgrpc, "INPUT", x, "FP32")]).as_numpy("OUTPUT")
        assert out.shape == x.shape and out.ravel()[0] == 3.5
        assert list(client.get_model_metadata(name).inputs[0].shape) == list(x.shape)


def test_a_scalar_model_whose_config_asks_for_more_than_one_element_is_not_loaded(qa_server, tmp_path):
    import shutil

    repo = tmp_path / "r"
    repo.mkdir()
    shutil.copytree(qa_server.cmd[qa_server.cmd.index("--repository") + 1] + "/scalar_1dim", repo / "scalar_1dim")
    cfg = repo / "scalar_1dim" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace("dims: [ 1 ]", "dims: [ 2 ]"))
    with ServerProcess(repo, "--allow-unverified", "--no-strict-readiness") as srv:
        index = thttp.InferenceServerClient(srv.http).get_model_repository_index()
    entry = next(e for e in index if e["name"] == "scalar_1dim" and e.get("reason"))
    assert entry["state"] == "UNAVAILABLE" and "is a scalar (no shape)" in entry["reason"] and "[2]" in entry["reason"]


def test_optional_inputs_may_be_left_out_and_the_count_is_told_in_tritons_words(qa_server):
    client = _grpc(qa_server)
    assert client.infer("all_optional", []).as_numpy("OUTPUT0").tolist() == [1.0]
    x = np.arange(2, dtype=np.float32)
    three = [_input(tgrpc, f"INPUT{i}", x, "FP32") for i in range(3)]
    assert client.infer("one_optional", three).as_numpy("OUTPUT0").tolist() == [1.0]
    assert client.infer("one_optional", three + [_input(tgrpc, "INPUT3", x, "FP32")]).as_numpy("OUTPUT0").tolist() == [1.0]
    with pytest.raises(InferenceServerException) as e:
        client.infer("all_required", [])
    assert ("expected 3 inputs but got 0 inputs for model 'all_required'. Got input(s) [], but missing required "
            "input(s) ['INPUT0','INPUT1','INPUT2']. Please provide all required input(s).") in str(e.value)
    with pytest.raises(InferenceServerException) as e:
        client.infer("one_optional", three[:1])
    assert ("expected number of inputs between 3 and 4 but got 1 inputs for model 'one_optional'. Got input(s) "
            "['INPUT0'], but missing required input(s) ['INPUT1','INPUT2']. Please provide all required input(s).") \
        in str(e.value)
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"


ANY_BYTES = np.array([[b"\nF\n'\n\x01a\x12\"\x1a \xfa\x03\x94", b"", "h\xe9llo".encode(), b"\x00\xff\xfe"]],
                     dtype=object)


def test_bytes_tensors_carry_any_bytes_where_the_model_only_moves_them(qa_server):
    for mod, address, binary in ((tgrpc, qa_server.grpc, None), (thttp, qa_server.http, True)):
        client = mod.InferenceServerClient(address)
        inp = mod.InferInput("INPUT0", list(ANY_BYTES.shape), "BYTES")
        if binary:
            inp.set_data_from_numpy(ANY_BYTES, binary_data=True)
            out = client.infer("moves_strings", [inp], outputs=[mod.InferRequestedOutput("OUTPUT0", binary_data=True)])
        else:
            inp.set_data_from_numpy(ANY_BYTES)
            out = client.infer("moves_strings", [inp])
        assert out.as_numpy("OUTPUT0").tolist() == ANY_BYTES.tolist(), mod.__name__
    # text (JSON) keeps its UTF-8 meaning through the same model
    client = thttp.InferenceServerClient(qa_server.http)
    words = np.array([["héllo", "wörld"]], dtype=object)
    inp = thttp.InferInput("INPUT0", [1, 2], "BYTES")
    inp.set_data_from_numpy(words, binary_data=False)
    got = client.infer("moves_strings", [inp], outputs=[thttp.InferRequestedOutput("OUTPUT0", binary_data=False)])
    assert [x.decode() if isinstance(x, bytes) else x for x in got.as_numpy("OUTPUT0").ravel()] == ["héllo", "wörld"]
    # JSON cannot carry bytes that are not UTF-8: asked for as JSON, that output is a 400 saying so
    inp = thttp.InferInput("INPUT0", list(ANY_BYTES.shape), "BYTES")
    inp.set_data_from_numpy(ANY_BYTES, binary_data=True)
    with pytest.raises(InferenceServerException, match="element 0 is not UTF-8 text, which JSON cannot carry"):
        client.infer("moves_strings", [inp], outputs=[thttp.InferRequestedOutput("OUTPUT0", binary_data=False)])


def test_a_model_that_reads_its_strings_gets_text_and_refuses_other_bytes_naming_the_element(qa_server):
    client = _grpc(qa_server)
    words = np.array([["HÉllo".encode(), b"WoRLD"]], dtype=object)
    out = client.infer("reads_strings", [_input(tgrpc, "INPUT0", words, "BYTES")]).as_numpy("OUTPUT0")
    assert out.tolist() == [["héllo".encode(), b"world"]]
    bad = np.array([[b"ok", b"\xff\xfe"]], dtype=object)
    with pytest.raises(InferenceServerException, match="element 1 is not UTF-8 text, and this model reads its strings"):
        client.infer("reads_strings", [_input(tgrpc, "INPUT0", bad, "BYTES")])


def test_string_element_counts_are_told_in_tritons_words(qa_server):
    client = _grpc(qa_server)
    for sent, words in ((14, "expected 16 string elements for inference input 'INPUT0' for model 'moves_strings', got 14"),
                        (18, "unexpected number of string elements 17 for inference input 'INPUT0' for model "
                             "'moves_strings', expecting 16")):
        inp = _input(tgrpc, "INPUT0", np.array([[str(i) for i in range(sent)]], dtype=object), "BYTES")
        inp.set_shape([1, 16])
        with pytest.raises(InferenceServerException) as e:
            client.infer("moves_strings", [inp])
        assert words in str(e.value) and e.value.status() == "StatusCode.INVALID_ARGUMENT"


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_a_region_unregistered_while_a_request_uses_it_stays_until_the_request_ends(qa_server, transport):
    mod = thttp if transport == "http" else tgrpc
    client = mod.InferenceServerClient(qa_server.http if transport == "http" else qa_server.grpc)
    admin = thttp.InferenceServerClient(qa_server.http)
    x = np.arange(4, dtype=np.float32)[None]
    handles = [shm.create_shared_memory_region(f"qa_{transport}_{s}", f"/qa_{transport}_{s}", 16) for s in ("in", "out")]
    try:
        shm.set_shared_memory_region(handles[0], [x])
        for s in ("in", "out"):
            client.register_system_shared_memory(f"qa_{transport}_{s}", f"/qa_{transport}_{s}", 16)
        inp = mod.InferInput("INPUT0", [1, 4], "FP32")
        inp.set_shared_memory(f"qa_{transport}_in", 16)
        out = mod.InferRequestedOutput("OUTPUT0")
        out.set_shared_memory(f"qa_{transport}_out", 16)
        pending = client.async_infer("windowed", [inp], outputs=[out]) if transport == "http" else None
        results: list = []
        if pending is None:
            client.async_infer("windowed", [inp], lambda result, error: results.append(error or result), outputs=[out])
        time.sleep(0.8)                                  # the request waits in its 3 s batch window
        admin.unregister_system_shared_memory()          # all: answered at once, the regions in use stay
        names = {r["name"] for r in admin.get_system_shared_memory_status()}
        assert {f"qa_{transport}_in", f"qa_{transport}_out"} <= names
        if pending is not None:
            results.append(pending.get_result(timeout=30))
        deadline = time.time() + 30
        while not results and time.time() < deadline:
            time.sleep(0.05)
        assert results and not isinstance(results[0], Exception), results
        assert (shm.get_contents_as_numpy(handles[1], np.float32, [1, 4]) == x).all()
        assert admin.get_system_shared_memory_status() == []          # gone once the request ended
        with pytest.raises(InferenceServerException, match="Unable to find system shared memory region"):
            admin.get_system_shared_memory_status(f"qa_{transport}_in")
    finally:
        for h in handles:
            shm.destroy_shared_memory_region(h)


def test_shared_memory_mistakes_are_told_in_tritons_words(qa_server):
    client = _grpc(qa_server)
    handle = shm.create_shared_memory_region("qa_words", "/qa_words", 64)
    try:
        with pytest.raises(InferenceServerException, match="failed to register shared memory region.*invalid args"):
            client.register_system_shared_memory("qa_words", "/qa_words", 65)
        with pytest.raises(InferenceServerException, match="invalid shm key '/'"):
            client.register_system_shared_memory("qa_key", "/", 8)
        client.register_system_shared_memory("qa_words", "/qa_words", 64)
        with pytest.raises(InferenceServerException, match="shared memory region 'qa_words' already in manager"):
            client.register_system_shared_memory("qa_words", "/qa_words", 64)
        x = np.arange(4, dtype=np.float32)[None]
        for offset, size, words in ((64, 16, "Invalid offset for shared memory region"),
                                    (56, 16, "Invalid offset \\+ byte size for shared memory region")):
            inp = _input(tgrpc, "INPUT0", x, "FP32")
            out = tgrpc.InferRequestedOutput("OUTPUT0")
            out.set_shared_memory("qa_words", size, offset=offset)
            with pytest.raises(InferenceServerException, match=words):
                client.infer("windowed", [inp], outputs=[out])
    finally:
        client.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(handle)


def test_a_request_queued_behind_a_busy_instance_gets_tritons_timeout_answer(qa_server):
    client = _grpc(qa_server)
    x = np.ones((1, 8), np.float32)
    done: dict[str, float] = {}
    first = threading.Thread(target=lambda: (client.infer("busy", [_input(tgrpc, "INPUT0", x, "FP32")]),
                                             done.setdefault("first", time.monotonic())))
    first.start()
    time.sleep(0.3)                                     # the one instance executes the first request
    with pytest.raises(InferenceServerException) as e:
        client.infer("busy", [_input(tgrpc, "INPUT0", x, "FP32")])
    rejected = time.monotonic()
    first.join(120)
    assert e.value.status() == "StatusCode.UNAVAILABLE" and e.value.message() == "Request timeout expired"
    assert rejected < done["first"]                    # answered while the instance was still busy


def test_model_names_and_outputs_are_told_in_tritons_words(qa_server):
    client = _grpc(qa_server)
    with pytest.raises(InferenceServerException, match="Model name cannot be empty. Please enter a valid name"):
        client.load_model(" ")
    for name in ("../etc", "a/../b", "..", " .."):
        with pytest.raises(InferenceServerException, match="model name must not contain path traversal characters"):
            client.load_model(name)
    with pytest.raises(InferenceServerException, match="failed to poll from model repository"):
        client.load_model("model123")
    with pytest.raises(InferenceServerException) as e:
        client.unload_model("../etc")
    assert "path traversal" not in str(e.value)
    x = np.arange(4, dtype=np.float32)[None]
    with pytest.raises(InferenceServerException) as e:
        client.infer("windowed", [_input(tgrpc, "INPUT0", x, "FP32")], outputs=[tgrpc.InferRequestedOutput("DUMMY")])
    assert e.value.message().startswith("unexpected inference output 'DUMMY' for model 'windowed'")
