"""serve: a page to draw a digit or drop a photo on, and the model's answer to it.

    python mnist_recognition.py serve --checkpoint outputs/lenet5_mnist.pt   # then open http://127.0.0.1:8000/

GET / is the page (page.html beside this file); POST /predict takes an image's bytes and answers
with predict's JSON (the number, and each digit in it) plus the network's 28x28 input of each; POST
/predict?layers=1 adds every layer's values and why it answered, for the least sure digit
(companions/reports/inside.py). Nothing else is served: no file is ever read
by its path. The HTTP contract is in docs/serve.md.
"""

import base64
import contextlib
import errno
import html
import io
import ipaddress
import json
import socket
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch
from loguru import logger
from PIL import Image

from companions.reports.inside import as_json, look_inside
from companions.training.devices import pick_device
from companions.training.errors import CliError
from companions.using import own_images
from companions.using.predict import answer, least_sure, read_number
from companions.using.prepare import ImageTooLarge, NoInk, UnreadableImage, normalised, open_grayscale
from companions.using.trained import doubt_of, trained_model

PAGE_FILE = Path(__file__).with_name("page.html")
MAX_BODY_BYTES = 10 * 1024 * 1024  # larger uploads are refused (413) before they are read
ROUTES = {"/": ("GET", "HEAD"), "/predict": ("POST",), "/examples": ("GET", "HEAD", "POST")}
# What each of the preparation's errors means to a client.
STATUS_OF = {UnreadableImage: 400, ImageTooLarge: 413, NoInk: 422}


def status_of(error):
    """The HTTP status for one of the preparation's errors."""
    return next(code for kind, code in STATUS_OF.items() if isinstance(error, kind))


class EmptyBody(UnreadableImage):
    """A request without an image in it."""


def describe_model(checkpoint, payload, dataset):
    """'outputs/lenet5_mnist.pt: LeNet-5 trained on MNIST, recipe fast, 99.16 % test accuracy'"""
    recipe = payload.get("config", {}).get("recipe", "unknown")
    accuracy = (
        f", {payload['eval_accuracy']:.2f} % {payload['eval_split']} accuracy" if "eval_accuracy" in payload else ""
    )
    return f"{checkpoint}: LeNet-5 trained on {dataset.title}, recipe {recipe}{accuracy}"


def page_for(model_description, dataset, collecting=False):
    """The page, with the model's class names, a line about the model, and whether it saves examples."""
    return (
        PAGE_FILE.read_text(encoding="utf-8")
        .replace("__CLASSES__", json.dumps(list(dataset.classes)))
        .replace("__NOT_OF_KIND__", json.dumps(dataset.not_of_kind))
        .replace("__COLLECT__", json.dumps(collecting))
        .replace("__MODEL__", html.escape(model_description))
    )


def png_data_url(pixels):
    """28x28 0..1 pixels as a PNG data URL."""
    buffer = io.BytesIO()
    Image.fromarray((pixels * 255).round().astype(np.uint8)).save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class DigitServer(ThreadingHTTPServer):
    """Serves the page and answers POST /predict with the model's reading of the image sent."""

    # server_close closes every open connection, then waits for its thread: a thread still alive
    # when the interpreter ends can make torch abort the process ("terminate called ...").
    daemon_threads, block_on_close = False, True
    request_queue_size = 64  # connections waiting to be accepted: a burst of clients waits instead of being refused

    def __init__(self, address, model, learned, device, dataset, page, collect=None):
        self.model, self.learned, self.device, self.dataset, self.page = model, learned, device, dataset, page.encode()
        self.collect = collect  # the folder that POST /examples saves into; None: off
        # The request threads share the model. A forward pass under inference_mode changes nothing
        # in it, so the lock is not for safety: one pass at a time is faster than several.
        self.model_lock = threading.Lock()
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.connections, self.connections_lock = set(), threading.Lock()
        super().__init__(address, DigitRequestHandler)

    def process_request_thread(self, request, client_address):
        with self.connections_lock:
            self.connections.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.connections_lock:
                self.connections.discard(request)

    def server_close(self):
        with self.connections_lock:
            for connection in self.connections:
                with contextlib.suppress(OSError):  # closed meanwhile
                    connection.shutdown(socket.SHUT_RDWR)  # wakes its thread, waiting for the next request
        super().server_close()

    def handle_error(self, request, client_address):
        logger.debug("A connection from {} broke off: {}", client_address, sys.exc_info()[1])

    def collected(self):
        return {"folder": str(self.collect), "counts": own_images.counts(self.collect, self.dataset)}

    def prediction_for(self, body, with_layers=False):
        """The JSON-ready answer for an image's bytes: predict's, with each piece's 28x28 input, and
        with every layer's values and why it answered (for the least sure digit) where
        `with_layers`; raises the preparation's ImageError."""
        if not body:
            raise EmptyBody("the body is empty: send an image's bytes")
        gray = open_grayscale(io.BytesIO(body))
        result, pieces = read_number(self.model, self.learned, gray, self.device, self.dataset, self.model_lock)
        least = least_sure(result["digits"])
        if with_layers:
            network_input = normalised(pieces[least].pixels, self.dataset)
            with self.model_lock:
                seen = look_inside(self.model, network_input, self.dataset)
            if len(pieces) == 1:  # one digit: the answer from the same forward pass as the layers
                batch = network_input.unsqueeze(0).to(self.device)
                result |= answer(seen.scores, self.learned, batch, self.dataset)
                result["digits"][0] |= {key: result[key] for key in result["digits"][0] if key != "box"}
            result |= as_json(seen)
        for digit, piece in zip(result["digits"], pieces):
            digit["input"] = png_data_url(piece.pixels)
        return {**result, "input": result["digits"][least]["input"]}


class DigitRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a page or client reuses its connection
    server_version = "mnist_recognition"
    timeout = 30  # seconds a connection may stay silent, idle or in the middle of a body
    disable_nagle_algorithm = True  # headers and body go out at once, not 40 ms apart (delayed ACKs)

    def route(self):
        """Every method comes here (self.command names it), so that each gets a JSON answer."""
        try:
            self.dispatch(self.command)
        except Exception:  # a bug must cost one answer, not the server
            logger.exception("{} {} failed", self.command, self.path)
            self.send_error_json(500, "the server failed on this request; its log says why")

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = route

    def dispatch(self, method):
        path = urllib.parse.urlsplit(self.path).path
        if path not in ROUTES:
            return self.send_error_json(404, f"nothing at {path}: the page is at / and answers come from POST /predict")
        if method not in ROUTES[path]:
            allowed = ", ".join(ROUTES[path])
            return self.send_error_json(405, f"{path} takes {allowed}, not {method}", Allow=allowed)
        if path == "/":
            return self.send(200, self.server.page, "text/html; charset=utf-8")
        if path == "/predict":
            return self.predict()
        if self.server.collect is None:
            return self.send_error_json(403, "saving examples is off: start serve with --collect DIR")
        if method in ("GET", "HEAD"):
            return self.send(200, json.dumps(self.server.collected()).encode(), "application/json")
        self.save_example()

    def save_example(self):
        """POST /examples?label=K: the image in the body saved as an example of class K (201)."""
        label = self.label()
        if label is None:
            return self.send_error_json(
                400, f"give the image's class as ?label=K, K from 0 to {len(self.server.dataset.classes) - 1}"
            )
        body = self.read_body()
        if body is None:
            return  # answered already
        try:
            if not body:
                raise EmptyBody("the body is empty: send an image's bytes")
            saved = own_images.save_example(self.server.collect, self.server.dataset, label, body)
        except tuple(STATUS_OF) as error:
            return self.send_error_json(status_of(error), str(error), body_read=True)
        except own_images.FolderNotWritable as error:  # 507: Insufficient Storage
            return self.send_error_json(507 if error.no_space else 403, str(error), body_read=True)
        answer = {
            "file": str(saved),
            "class": label,
            "name": self.server.dataset.classes[label],
            **self.server.collected(),
        }
        self.send(201, json.dumps(answer).encode(), "application/json")

    def query(self, name):
        """The values of ?name=... in the request's address."""
        return urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).get(name, [])

    def label(self):
        """The ?label=K of the request as a class index, or None where it is missing or no class."""
        values = self.query("label")
        if len(values) != 1 or not is_count(values[0]) or int(values[0]) >= len(self.server.dataset.classes):
            return None
        return int(values[0])

    def predict(self):
        layers = self.query("layers")
        if layers not in ([], ["0"], ["1"]):
            return self.send_error_json(
                400, "?layers=1 adds every layer's values to the answer; leave it out, or give 0"
            )
        body = self.read_body()
        if body is None:
            return  # answered already
        try:
            prediction = self.server.prediction_for(body, with_layers=layers == ["1"])
        except tuple(STATUS_OF) as error:
            return self.send_error_json(status_of(error), str(error), body_read=True)
        self.send(200, json.dumps(prediction).encode(), "application/json")

    def read_body(self):
        """The request's body, or None once an error has been answered."""
        length = self.headers.get("Content-Length")
        if length is None:
            return self.send_error_json(411, "send the image with a Content-Length header")
        if not is_count(length):
            return self.send_error_json(400, f"Content-Length {length!r} is not a byte count")
        if int(length) > MAX_BODY_BYTES:
            return self.send_error_json(413, f"the image is over {MAX_BODY_BYTES // 2**20} MB")
        try:
            body = self.rfile.read(int(length))
        except TimeoutError:
            return self.send_error_json(408, f"the body did not arrive within {self.timeout} s")
        if len(body) < int(length):
            return self.send_error_json(400, "the body ended before its Content-Length")
        return body

    def send_error_json(self, status, message, body_read=False, **headers):
        """A 4xx or 5xx answer: one line of JSON, {"error": message}."""
        if not body_read:
            self.close_connection = True  # what is left of the request is unread: the connection cannot go on
        self.send(status, json.dumps({"error": message}).encode(), "application/json", **headers)

    def send(self, status, body, content_type, **headers):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in headers.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        # The headers and the body in one write (end_headers would send the headers on their own).
        self._headers_buffer.append(b"\r\n" + (body if self.command != "HEAD" else b""))
        self.flush_headers()

    def log_message(self, format, *args):
        pass  # one line per request would drown the log; errors are logged where they happen


def is_count(text):
    """Whether `text` is a whole number written in the digits 0-9 (str.isdigit also takes '²', which int() refuses)."""
    return text.isascii() and text.isdigit()


def is_loopback(host):
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except (socket.gaierror, ValueError):
        return False


def start_server(args):
    """The server, listening; its model is the checkpoint's, on the device asked for."""
    device = pick_device(args.device)
    model, payload, dataset = trained_model(args, device)
    learned = doubt_of(payload, args.checkpoint, device)
    description = describe_model(args.checkpoint, payload, dataset)
    try:
        page = page_for(description, dataset, collecting=args.collect is not None)
        server = DigitServer((args.host, args.port), model, learned, device, dataset, page, args.collect)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise CliError(
                f"--port {args.port}: the port is already in use on {args.host}. Choose another "
                f"with --port, or stop what listens there."
            ) from None
        raise CliError(
            f"--host {args.host}: cannot listen there ({error.strerror or error}). Give an address "
            f"of this machine, such as 127.0.0.1."
        ) from None
    logger.info("Model {}", description)
    if args.collect is not None:
        logger.info("Saving the images you label on the page into {}/, one sub-folder per class", args.collect)
    if not is_loopback(args.host):
        logger.warning(
            "Listening on {}: other machines that reach this one can use the page too. "
            "--host 127.0.0.1 keeps it to this machine.",
            args.host,
        )
    return server


def command(args):
    """Serve until Ctrl-C."""
    server = start_server(args)
    host, port = server.server_address[:2]
    logger.info(
        "Open http://{}:{}/ to draw a digit or drop a photo; Ctrl-C stops the server",
        f"[{host}]" if ":" in host else host,
        port,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # requests come in parallel, and each is a tiny forward pass
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("Stopped")
    finally:
        server.server_close()
        torch.set_num_threads(threads)  # main() may run again in this process (the tests do)
    return 0
