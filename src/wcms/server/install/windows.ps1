# WCMS client for Windows, served by the WCMS server at @@SERVER@@.
# Run in an elevated PowerShell (Run as administrator), one line per PC:
#   $env:WCMS_PIN='123456'; irm @@SERVER@@/install/windows.ps1 | iex
# Re-running it upgrades in place; -Uninstall (or $env:WCMS_UNINSTALL='1') removes everything.
# For a Group Policy startup script use windows.cmd instead: it runs nothing it fetches.
#
# Trust: this script holds the SHA-256 of the bundle and the operator's public key, so it is
# only as trustworthy as the way it reached the PC. It refuses to run when its server is plain
# http:// (anyone on the path could have rewritten it) unless -AllowHttp (or
# $env:WCMS_ALLOW_HTTP='1') says it came another trusted way: copied from the server itself to
# a share only administrators can write. Before running anything it downloaded it checks the
# zip's SHA-256 below; on a PC with the client installed, the INSTALLED python.exe then checks
# the new bundle against the key this PC pinned, and only then does the new bundle run.
param(
    [string]$Pin = $env:WCMS_PIN,
    [switch]$Uninstall = ($env:WCMS_UNINSTALL -eq '1'),
    [switch]$AllowHttp = ($env:WCMS_ALLOW_HTTP -eq '1')
)

$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'
$Server = '@@SERVER@@'
$Bundle = '@@BUNDLE@@'
$Sha256 = '@@SHA256@@'
$PublicKey = '@@PUBLIC_KEY@@'
$Target = Join-Path $env:ProgramFiles 'WCMS'
$PinnedKey = Join-Path $env:ProgramData 'WCMS\update_key.pub'

$me = [Security.Principal.WindowsPrincipal][Security.Principal.WindowsIdentity]::GetCurrent()
if (-not $me.IsInRole([Security.Principal.WindowsBuiltInRole]::Administrator)) {
    Write-Host 'WCMS: run this in an elevated PowerShell (Run as administrator).'
    exit 1
}

if (-not $Server.StartsWith('https://') -and -not $AllowHttp) {
    Write-Host "WCMS: refused: this script names $Server, plain http, so it may have been changed"
    Write-Host '  on its way here. Serve it over https (WCMS_PUBLIC_URL=https://... on the server),'
    Write-Host '  or copy it from the server to a share only administrators can write and run that'
    Write-Host '  copy with -AllowHttp (the bundle is then checked against the SHA-256 in it).'
    exit 1
}

if ($Uninstall) {
    if (Test-Path "$Target\python.exe") {
        & "$Target\python.exe" -m wcms.client.installer --uninstall --target $Target
    }
    Remove-Item -Recurse -Force -ErrorAction SilentlyContinue $Target, "$Target.old", "$Target.staged", "$Target.download"
    Write-Host 'WCMS: client removed.'
    exit 0
}

if ($Sha256 -notmatch '^[0-9a-f]{64}$') {
    Write-Host 'WCMS: refused: this script holds no SHA-256 for the bundle (rebuild it on the server).'
    exit 1
}

if (-not $Pin -and -not (Test-Path "$env:ProgramData\WCMS\token")) {
    $Pin = Read-Host 'WCMS registration PIN (6 digits, from `wcms pin create`)'
}

# Under Program Files, which only administrators can write: nothing can be slipped in beside the
# new python.exe (a DLL it would load) between the checks and the run.
$work = "$Target.download"
Remove-Item -Recurse -Force -ErrorAction SilentlyContinue $work
New-Item -ItemType Directory -Path $work | Out-Null
$code = 1
try {
    [Net.ServicePointManager]::SecurityProtocol = [Net.ServicePointManager]::SecurityProtocol -bor 3072
    $zip = Join-Path $work $Bundle
    $new = Join-Path $work 'bundle'
    Write-Host "WCMS: downloading $Bundle"
    Invoke-WebRequest -UseBasicParsing -Uri "$Server/install/$Bundle" -OutFile $zip
    # 1. The zip against the SHA-256 this script holds: nothing of it is used before.
    $actual = (Get-FileHash -Algorithm SHA256 -Path $zip).Hash.ToLower()
    if ($actual -ne $Sha256) { throw "the download's SHA-256 is $actual, not ${Sha256}: refused" }
    Expand-Archive -Path $zip -DestinationPath $new
    # 2. With a client installed, its own (trusted) python.exe checks every file of the new
    #    bundle and the manifest's signature against the key this PC pinned.
    if (Test-Path "$Target\python.exe") {
        if ((Test-Path $PinnedKey) -or $PublicKey) {
            $check = @('-m', 'wcms.bundle.check', '--source', $new, '--pinned-key-file', $PinnedKey)
            if ($PublicKey) { $check += @('--key', $PublicKey) }
            & "$Target\python.exe" @check
            if ($LASTEXITCODE -ne 0) {
                throw "the installed client refused the new bundle (exit $LASTEXITCODE): nothing of it ran"
            }
        } else {
            Write-Host 'WCMS: unsigned bundles: checked against the SHA-256 in this script only'
        }
    }
    # 3. Only now the new bundle's installer, which checks it once more and pins the key.
    $installer = @('-m', 'wcms.client.installer', '--source', $new, '--target', $Target,
                   '--server', $Server)
    if ($Pin) { $installer += @('--pin', $Pin) }
    if ($PublicKey) { $installer += @('--public-key', $PublicKey) }
    & "$new\python.exe" @installer
    $code = $LASTEXITCODE
} finally {
    Remove-Item -Recurse -Force -ErrorAction SilentlyContinue $work
}
exit $code
