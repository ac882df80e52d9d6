"""What the WDF tests share: the variables the sample needs."""

VARIABLES = {
    "NS1": "/datasets/ns1",
    "NS2": "/datasets/ns2",
    "SESSION": "s1",
    "USER": "alice",
    "WORKFLOW": "wf",
}
