"""Prepares a running moto server for the IAM join test and prints assumed-role credentials as JSON.

Usage: moto_setup.py ENDPOINT SESSION_NAME

Creates the role `teleport-bot-role` and a user allowed to assume it (before signature checks are
switched on), switches moto's signature checks on with POST /moto-api/reset-auth, then assumes the
role as an EC2 instance would (RoleSessionName = instance id) with the user's signed request.
"""

import json
import sys
import urllib.request

import boto3

endpoint, session_name = sys.argv[1], sys.argv[2]
ALLOW_ALL = json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
)
TRUST = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}],
    }
)


def client(service, **keys):
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=keys.get("id", "AKIDSETUP"),
        aws_secret_access_key=keys.get("secret", "setup"),
    )


# Five unsigned setup calls, allowed before the checks start.
reset = urllib.request.Request(
    f"{endpoint}/moto-api/reset-auth", data=b"5", method="POST", headers={"Content-Type": "text/plain"}
)
urllib.request.urlopen(reset)
iam = client("iam")
role = iam.create_role(RoleName="teleport-bot-role", AssumeRolePolicyDocument=TRUST)["Role"]
iam.put_role_policy(RoleName="teleport-bot-role", PolicyName="all", PolicyDocument=ALLOW_ALL)
iam.create_user(UserName="provisioner")
iam.put_user_policy(UserName="provisioner", PolicyName="all", PolicyDocument=ALLOW_ALL)
key = iam.create_access_key(UserName="provisioner")["AccessKey"]

sts = client("sts", id=key["AccessKeyId"], secret=key["SecretAccessKey"])
creds = sts.assume_role(RoleArn=role["Arn"], RoleSessionName=session_name)["Credentials"]
# Prove the checks are on: a request with a wrong secret must be refused.
try:
    client("sts", id=key["AccessKeyId"], secret="wrong").get_caller_identity()
    sys.exit("moto accepted a bad signature: its checks are off")
except Exception as error:  # botocore ClientError
    if "SignatureDoesNotMatch" not in str(error):
        raise
print(
    json.dumps(
        {
            "AccessKeyId": creds["AccessKeyId"],
            "SecretAccessKey": creds["SecretAccessKey"],
            "Token": creds["SessionToken"],
            "Expiration": creds["Expiration"].isoformat(),
            "Code": "Success",
            "Type": "AWS-HMAC",
        }
    )
)
