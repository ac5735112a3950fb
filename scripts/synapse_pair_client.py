"""Client calls shared by the benchmarks that run on tests/interop/synapse_pair.sh's servers:
JSON over HTTP(S) to either server (Synapse's certificate is self-signed: a test network only),
carol's login on Lattice and a user's registration on Synapse."""
import json, ssl, urllib.error, urllib.request

INSECURE = ssl.create_default_context()
INSECURE.check_hostname = False
INSECURE.verify_mode = ssl.CERT_NONE


def call(method, url, token=None, body=None):
    """The JSON answer; an error answer as its JSON plus "status"."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, context=INSECURE, timeout=300) as answer:
            return json.load(answer)
    except urllib.error.HTTPError as error:
        return {"status": error.code, **json.load(error)}


def login_carol(lattice_base):
    """The access token of carol, whom synapse_pair.sh creates on Lattice."""
    body = {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "carol"},
            "password": "correct horse battery"}
    return call("POST", f"{lattice_base}/login", body=body)["access_token"]


def register_on_synapse(synapse_base, name):
    """Registers `name` on Synapse (open registration, m.login.dummy); its access token."""
    body = {"username": name, "password": "correct horse battery"}
    session = call("POST", f"{synapse_base}/register", body=body)["session"]
    body["auth"] = {"type": "m.login.dummy", "session": session}
    return call("POST", f"{synapse_base}/register", body=body)["access_token"]
