# Regenerate with: python3 tests/data/rfc4475/generate.py tests/data/rfc4475
# Generates tests/data/rfc4475/*.sip: RFC 4475 3.1.1 and 3.3 requests, top Via on 127.0.0.1
# with rport (responses come back to the sender), LF -> CRLF, #LEN# = body length.
import os, sys
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
SDP = """v=0
o=mhandley 29739 7272939 IN IP4 192.0.2.3
s=-
c=IN IP4 192.0.2.4
t=0 0
m=audio 49217 RTP/AVP 0 12
m=video 3227 RTP/AVP 31
a=rtpmap:31 LPC
"""
def sip(text):
    text = text.replace("<BEL>", "\x07").replace("<NUL>", "\x00").replace("<DEL>", "\x7f")
    if "\n\n" in text:
        head, body = text.split("\n\n", 1)
    else:
        head, body = text, ""
    body = body.replace("\n", "\r\n").encode()
    head = head.replace("\n", "\r\n").replace("#LEN#", str(len(body)))
    return head.encode() + b"\r\n\r\n" + body

msgs = {}
msgs["3.1.1.1_wsinv"] = sip('''INVITE sip:vivekg@chair-dnrc.example.com;unknownparam SIP/2.0
TO :
 sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n
from   : "J Rosenberg \\\\\\""       <sip:jdrosen@example.com>
  ;
  tag = 98asjd8
MaX-fOrWaRdS: 0068
Call-ID: wsinv.ndaksdj@192.0.2.1
Content-Length   : #LEN#
cseq: 0009
  INVITE
Via  : SIP  /   2.0
 /UDP
    127.0.0.1;branch=390skdjuw;rport
s :
NewFangledHeader:   newfangled value
 continued newfangled value
UnknownHeaderWithUnusualValue: ;;,,;;,;
Content-Type: application/sdp
Route:
 <sip:services.example.com;lr;unknownwith=value;unknown-no-value>
v:  SIP  / 2.0  / TCP     spindle.example.com   ;
  branch  =   z9hG4bK9ikj8  ,
 SIP  /    2.0   / UDP  192.168.255.111   ; branch=
 z9hG4bK30239
m:"Quoted string \\"\\"" <sip:jdrosen@example.com> ; newparam =
      newvalue ;
  secondparam ; q = 0.33

''' + SDP)
msgs["3.1.1.2_intmeth"] = sip('''!interesting-Method0123456789_*+`.%indeed'~ sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*:&it+has=1,weird!*pas$wo~d_too.(doesn't-it)@example.com SIP/2.0
Via: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bK-.!%66*_+`'~;rport
To: "BEL:\\<BEL> NUL:\\<NUL> DEL:\\<DEL>" <sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*@example.com>
From: token1~` token2'+_ token3*%!.- <sip:mundane@example.com>;fromParam''~+*_!.-%="\u0440\u0430\u0431\u043e\u0442\u0430\u044e\u0449\u0438\u0439";tag=_token~1'+`*%!-.
Call-ID: intmeth.word%ZK-!.*_+'@word`~)(><:\\/"][?}{
CSeq: 139122385 !interesting-Method0123456789_*+`.%indeed'~
Max-Forwards: 255
extensionHeader-!.%*+_`'~:\ufeff\u5927\u505c\u96fb
Content-Length: 0

''')
msgs["3.1.1.3_esc01"] = sip('''INVITE sip:sips%3Auser%40example.com@example.net SIP/2.0
To: sip:%75se%72@example.com
From: <sip:I%20have%20spaces@example.net>;tag=938
Max-Forwards: 87
i: esc01.239409asdfakjkn23onasd0-3234
CSeq: 234234 INVITE
Via: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKkdjuw;rport
C: application/sdp
Contact:
  <sip:cal%6Cer@host5.example.net;%6C%72;n%61me=v%61lue%25%34%31>
Content-Length: #LEN#

''' + SDP)
msgs["3.1.1.4_escnull"] = sip('''REGISTER sip:example.com SIP/2.0
To: sip:null-%00-null@example.com
From: sip:null-%00-null@example.com;tag=839923423
Max-Forwards: 70
Call-ID: escnull.39203ndfvkjdasfkq3w4otrq0adsfdfnavd
CSeq: 14398234 REGISTER
Via: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKkdjuw;rport
Contact: <sip:%00@host5.example.com>
Contact: <sip:%00%00@host5.example.com>
L:0

''')
msgs["3.1.1.5_esc02"] = sip('''RE%47IST%45R sip:registrar.example.com SIP/2.0
To: "%Z%45" <sip:resource@example.com>
From: "%Z%45" <sip:resource@example.com>;tag=f232jadfj23
Call-ID: esc02.asdfnqwo34rq23i34jrjasdcnl23nrlknsdf
Via: SIP/2.0/UDP 127.0.0.1;rport;branch=z9hG4bK209323
CSeq: 29344 RE%47IST%45R
Max-Forwards: 70
Contact: <sip:alias1@host1.example.com>
C%6Fntact: <sip:alias2@host2.example.com>
Contact: <sip:alias3@host3.example.com>
l: 0

''')
msgs["3.1.1.6_lwsdisp"] = sip('''OPTIONS sip:user@example.com SIP/2.0
To: sip:user@example.com
From: caller<sip:caller@example.com>;tag=323
Max-Forwards: 70
Call-ID: lwsdisp.1234abcd@funky.example.com
CSeq: 60 OPTIONS
Via: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKkdjuw;rport
l: 0

''')
extreme = "extreme" * 60
caller = "amazinglylongcallername" * 20
tag = "12982982" * 40
ll = "longlong" * 30
rr = "reallyreally" * 40
long_name = "Unknown-" + "LongLong" * 100
branch = "z9hG4bK" + "longbranch" * 50
t = f'''INVITE sip:user@example.com SIP/2.0
To: "I have a user name of {extreme} proportion"<sip:user@example.com:6000;unknownparam1=verylonglonglong{ll};longparamnamenamenamename{ll}=shortvalue>
F: sip:{caller}@example.net;tag={tag};unknownheaderparamname{ll}=unknowheaderparamvalue{ll};unknownValuelessparamname{ll}
Call-ID: longreq.one{rr}
CSeq: 3882340 INVITE
{long_name}: unknown-{ll}-value;unknown-{ll}-param-name=unknown-{ll}-param-value;unknown-{ll}-valueless
Via: SIP/2.0/UDP 127.0.0.1;branch={branch};rport
'''
for i in range(40):
    t += f"v: SIP/2.0/UDP sip{i}.example.com;branch=z9hG4bK{i}\n"
t += f"Max-Forwards: 70\nContact: <sip:{caller}@host5.example.net>\nContent-Type: application/sdp\nl: #LEN#\n\n{SDP}"
msgs["3.1.1.7_longreq"] = sip(t)
msgs["3.1.1.8_dblreq"] = sip('''REGISTER sip:example.com SIP/2.0
To: sip:j.user@example.com
From: sip:j.user@example.com;tag=43251j3j324
Max-Forwards: 8
I: dblreq.0ha0isndaksdj99sdfafnl3lk233412
Contact: sip:j.user@host.example.com
CSeq: 8 REGISTER
Via: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKkdjuw23492;rport
Content-Length: 0

INVITE sip:joe@example.com SIP/2.0
t: sip:joe@example.com
From: sip:caller@example.net;tag=141334
Max-Forwards: 8
Call-ID: dblreq.0ha0isnda977644900765@192.0.2.15
CSeq: 8 INVITE
Via: SIP/2.0/UDP 192.0.2.15;branch=z9hG4bKkdjuw380234
Content-Type: application/sdp
Content-Length: 150
''' + "\n" + SDP)
msgs["3.1.1.9_semiuri"] = sip('''OPTIONS sip:user;par=u%40example.net@example.com SIP/2.0
To: sip:j_user@example.com
From: sip:caller@example.org;tag=33242
Max-Forwards: 3
Call-ID: semiuri.0ha0isndaksdj
CSeq: 8 OPTIONS
Accept: application/sdp, application/pkcs7-mime,
        multipart/mixed, multipart/signed,
        message/sip, message/sipfrag
Via: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKkdjuw;rport
l: 0

''')
msgs["3.1.1.10_transports"] = sip('''OPTIONS sip:user@example.com SIP/2.0
To: sip:user@example.com
From: <sip:caller@example.com>;tag=323
Max-Forwards: 70
Call-ID:  transports.kijh4akdnaqjkwendsasfdj
Accept: application/sdp
CSeq: 60 OPTIONS
Via: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKkdjuw;rport
Via: SIP/2.0/SCTP t2.example.com;branch=z9hG4bKklasjdhf
Via: SIP/2.0/TLS t3.example.com;branch=z9hG4bK2980unddj
Via: SIP/2.0/UNKNOWN t4.example.com;branch=z9hG4bKasd0f3en
Via: SIP/2.0/TCP t5.example.com;branch=z9hG4bK0a9idfnee
l: 0

''')
body = b"--7a9cbec02ceef655\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: binary\r\n\r\nHello\r\n--7a9cbec02ceef655\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n\r\n"
body += bytes([0x30,0x82,0x01,0x52,0x06,0x09,0x2a,0x86,0x48,0x86,0xf7,0x0d,0x01,0x07,0x02,0xa0,0x82,0x01,0x43,0x30,0x82,0x01,0x3f,0x02,0x01,0x01,0x31,0x09,0x30,0x07,0x06,0x05,0x2b,0x0e,0x03,0x02,0x1a,0x00,0xff,0xfe,0x0d,0x0a,0x0d,0x0a,0x80,0x0d])
body += b"\r\n--7a9cbec02ceef655--\r\n"
head = '''MESSAGE sip:kumiko@example.org SIP/2.0
Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-d87543-4dade06d0bdb11ee-1--d87543-;rport
Max-Forwards: 70
Route: <sip:127.0.0.1:5080>
Identity: r5mwreLuyDRYBi/0TiPwEsY3rEVsk/G2WxhgTV1PF7hHuLIK0YWVKZhKv9Mj8UeXqkMVbnVq37CD+813gvYjcBUaZngQmXc9WNZSDNGCzA+fWl9MEUHWIZo1CeJebdY/XlgKeTa0Olvq0rt70Q5jiSfbqMJmQFteeivUhkMWYUA=
Contact: <sip:fluffy@127.0.0.1:5070>
To: <sip:kumiko@example.org>
From: <sip:fluffy@example.com>;tag=2fb0dcc9
Call-ID: 3d9485ad0c49859b@Zmx1ZmZ5LW1hYy0xNi5sb2NhbA..
CSeq: 1 MESSAGE
Content-Transfer-Encoding: binary
Content-Type: multipart/mixed;boundary=7a9cbec02ceef655
Date: Sat, 15 Oct 2005 04:44:56 GMT
User-Agent: SIPimp.org/0.2.5 (curses)
Content-Length: #LEN#
'''
msgs["3.1.1.11_mpart01"] = head.replace("\n", "\r\n").replace("#LEN#", str(len(body))).encode() + b"\r\n" + body
msgs["3.3.1_insuf"] = sip('''INVITE sip:user@example.com SIP/2.0
CSeq: 193942 INVITE
Via: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKkdj.insuf;rport
Content-Type: application/sdp
l: #LEN#

''' + SDP)
msgs["3.3.2_unkscm"] = sip('''OPTIONS nobodyKnowsThisScheme:totallyopaquecontent SIP/2.0
To: sip:user@example.com
From: sip:caller@example.net;tag=384
Max-Forwards: 3
Call-ID: unkscm.nasdfasser0q239nwsdfasdkl34
CSeq: 3923423 OPTIONS
Via: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKkdjuw;rport
Content-Length: 0

''')
msgs["3.3.3_novelsc"] = sip('''OPTIONS soap.beep://192.0.2.103:3002 SIP/2.0
To: sip:user@example.com
From: sip:caller@example.net;tag=384
Max-Forwards: 3
Call-ID: novelsc.asdfasser0q239nwsdfasdkl34
CSeq: 3923423 OPTIONS
Via: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKkdjuw;rport
Content-Length: 0

''')
msgs["3.3.4_unksm2"] = sip('''REGISTER sip:example.com SIP/2.0
To: isbn:2983792873
From: <http://www.example.com>;tag=3234233
Call-ID: unksm2.daksdj@hyphenated-host.example.com
CSeq: 234902 REGISTER
Max-Forwards: 70
Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKkdjuw;rport
Contact: <name:John_Smith>
l: 0

''')
msgs["3.3.5_bext01"] = sip('''OPTIONS sip:user@example.com SIP/2.0
To: sip:j_user@example.com
From: sip:caller@example.net;tag=242etr
Max-Forwards: 6
Call-ID: bext01.0ha0isndaksdj
Require: nothing
Proxy-Require: something
CSeq: 8 OPTIONS
Via: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKkdjuw;rport
Content-Length: 0

''')
msgs["3.3.6_invut"] = sip('''INVITE sip:user@example.com SIP/2.0
Contact: <sip:caller@host5.example.net>
To: sip:j.user@example.com
From: sip:caller@example.net;tag=8392034
Max-Forwards: 70
Call-ID: invut.0ha0isndaksdjadsfij34n23d
CSeq: 235448 INVITE
Via: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKkdjuw;rport
Content-Type: application/unknownformat
Content-Length: #LEN#

<audio>
 <pcmu port="443"/>
</audio>
''')
msgs["3.3.7_regaut01"] = sip('''REGISTER sip:example.com SIP/2.0
To: sip:j.user@example.com
From: sip:j.user@example.com;tag=87321hj23128
Max-Forwards: 8
Call-ID: regaut01.0ha0isndaksdj
CSeq: 9338 REGISTER
Via: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKkdjuw;rport
Authorization: NoOneKnowsThisScheme opaque-data=here
Content-Length:0

''')
msgs["3.3.8_multi01"] = sip('''INVITE sip:user@company.com SIP/2.0
Contact: <sip:caller@host25.example.net>
Via: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKkdjuw;rport
Max-Forwards: 70
CSeq: 5 INVITE
Call-ID: multi01.98asdh@192.0.2.1
CSeq: 59 INVITE
Call-ID: multi01.98asdh@192.0.2.2
From: sip:caller@example.com;tag=3413415
To: sip:user@example.com
To: sip:other@example.net
From: sip:caller@example.net;tag=2923420123
Content-Type: application/sdp
l: #LEN#

''' + SDP)
msgs["3.3.9_mcl01"] = sip('''OPTIONS sip:user@example.com SIP/2.0
Via: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bK-39234-23523;rport
To: sip:user@example.com
From: sip:caller@example.net;tag=34525
Max-Forwards: 6
Call-ID: mcl01.fhn2323orihawfdoa3o4r52o3irsdf
CSeq: 15932 OPTIONS
Content-Length: 13
Content-Length: 5

There's no way to know how many octets are supposed to be here.
''')
msgs["3.3.11_zeromf"] = sip('''OPTIONS sip:user@example.com SIP/2.0
To: sip:user@example.com
From: sip:caller@example.net;tag=3ghsd41
Call-ID: zeromf.jfasdlfnm2o2l43r5u0asdfas
CSeq: 39234321 OPTIONS
Via: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKkdjuw2349i;rport
Max-Forwards: 0
Content-Length: 0

''')
msgs["3.3.12_cparam01"] = sip('''REGISTER sip:example.com SIP/2.0
Via: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bK-c87542-fq1bmj;rport
Max-Forwards: 70
From: sip:watson@example.com;tag=DkfVgjkrtMwaerKKpe
To: sip:watson@example.com
Call-ID: cparam01.70710@saturn.example.com
CSeq: 2 REGISTER
Contact: sip:+19725552222@gw1.example.net;unknownparam
l: 0

''')
msgs["3.3.13_cparam02"] = sip('''REGISTER sip:example.com SIP/2.0
Via: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bK-c87542-dhg87h;rport
Max-Forwards: 70
From: sip:watson@example.com;tag=838293
To: sip:watson@example.com
Call-ID: cparam02.70710@saturn.example.com
CSeq: 3 REGISTER
Contact: <sip:+19725552222@gw1.example.net;unknownparam>
l: 0

''')
msgs["3.3.14_regescrt"] = sip('''REGISTER sip:example.com SIP/2.0
To: sip:user@example.com
From: sip:user@example.com;tag=8
Max-Forwards: 70
Call-ID: regescrt.k345asrl3fdbv@192.0.2.1
CSeq: 14398234 REGISTER
Via: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKkdjuw;rport
M: <sip:user@example.com?Route=%3Csip:sip.example.com%3E>
L:0

''')
msgs["3.3.15_sdp01"] = sip('''INVITE sip:user@example.com SIP/2.0
To: sip:j_user@example.com
Contact: <sip:caller@host15.example.net>
From: sip:caller@example.net;tag=234
Max-Forwards: 5
Call-ID: sdp01.ndaksdj9342dasdd
Accept: text/nobodyknowsthis
CSeq: 8 INVITE
Via: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKkdjuw;rport
Content-Length: #LEN#
Content-Type: application/sdp

v=0
o=mhandley 29739 7272939 IN IP4 192.0.2.5
s=-
c=IN IP4 192.0.2.5
t=0 0
m=audio 49217 RTP/AVP 0
''')
for k, v in msgs.items():
    # The RFC's examples share branches; here they are sent one after another to one server,
    # so each top Via gets its own (else they would be taken for retransmissions).
    sec = k.split("_")[0].replace(".", "-")
    v = v.replace(b"branch=z9hG4bKkdjuw;", ("branch=z9hG4bKkdjuw-" + sec + ";").encode(), 1)
    with open(os.path.join(out, k + ".sip"), "wb") as f:
        f.write(v)
print(len(msgs))
