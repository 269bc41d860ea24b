# WCMS client for Windows, served by the WCMS server at @@SERVER@@.
# Run in an elevated PowerShell (Run as administrator), one line per PC:
#   $env:WCMS_PIN='123456'; irm @@SERVER@@/install/windows.ps1 | iex
# or from cmd.exe / a Group Policy startup script (PIN as the first argument):
#   powershell -NoProfile -ExecutionPolicy Bypass -Command "& ([scriptblock]::Create((irm '@@SERVER@@/install/windows.ps1'))) 123456"
# Re-running it upgrades in place; -Uninstall (or $env:WCMS_UNINSTALL='1') removes everything.
param([string]$Pin = $env:WCMS_PIN, [switch]$Uninstall = ($env:WCMS_UNINSTALL -eq '1'))

$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'
$Server = '@@SERVER@@'
$Bundle = '@@BUNDLE@@'
$Sha256 = '@@SHA256@@'
$PublicKey = '@@PUBLIC_KEY@@'
$Target = Join-Path $env:ProgramFiles 'WCMS'

$me = [Security.Principal.WindowsPrincipal][Security.Principal.WindowsIdentity]::GetCurrent()
if (-not $me.IsInRole([Security.Principal.WindowsBuiltInRole]::Administrator)) {
    Write-Host 'WCMS: run this in an elevated PowerShell (Run as administrator).'
    exit 1
}

if ($Uninstall) {
    if (Test-Path "$Target\python.exe") {
        & "$Target\python.exe" -m wcms.client.installer --uninstall --target $Target
    }
    Remove-Item -Recurse -Force -ErrorAction SilentlyContinue $Target, "$Target.old", "$Target.staged"
    Write-Host 'WCMS: client removed.'
    exit 0
}

if (-not $Pin -and -not (Test-Path "$env:ProgramData\WCMS\token")) {
    $Pin = Read-Host 'WCMS registration PIN (6 digits, from `wcms pin create`)'
}

$work = Join-Path $env:TEMP ('wcms-' + [guid]::NewGuid().ToString('N'))
New-Item -ItemType Directory -Path $work | Out-Null
$code = 1
try {
    [Net.ServicePointManager]::SecurityProtocol = [Net.ServicePointManager]::SecurityProtocol -bor 3072
    $zip = Join-Path $work $Bundle
    Write-Host "WCMS: downloading $Bundle"
    Invoke-WebRequest -UseBasicParsing -Uri "$Server/install/$Bundle" -OutFile $zip
    $actual = (Get-FileHash -Algorithm SHA256 -Path $zip).Hash.ToLower()
    if ($actual -ne $Sha256) { throw "the download's SHA-256 is $actual, not $Sha256: refused" }
    Expand-Archive -Path $zip -DestinationPath "$work\bundle"
    # The installer checks every file against the manifest and the manifest's signature.
    $installer = @('-m', 'wcms.client.installer', '--source', "$work\bundle", '--target', $Target,
                   '--server', $Server)
    if ($Pin) { $installer += @('--pin', $Pin) }
    if ($PublicKey) { $installer += @('--public-key', $PublicKey) }
    & "$work\bundle\python.exe" @installer
    $code = $LASTEXITCODE
} finally {
    Remove-Item -Recurse -Force -ErrorAction SilentlyContinue $work
}
exit $code
