import sys, re
sys.argv = [sys.argv[0], "128", "128", "32"]
exec(open(".scratch/conv_diag.py").read().split("cases = {")[0])
f, args = run("lora", 8, init="peft")
txt = f.lower(*args).compile().as_text()
for line in txt.splitlines():
    if re.search(r"= \S+ (transpose|copy)\(", line) or "cudnn$conv" in line:
        m = re.match(r"\s*(\S+) = (\S+) (\w+)\(", line)
        tgt = re.search(r'custom_call_target="([^"]+)"', line)
        dl = re.search(r"dim_labels=(\S+?)[,}]", line)
        print(m.group(2) if m else line[:80], m.group(3) if m else "", tgt.group(1) if tgt else "", dl.group(1) if dl else "")
