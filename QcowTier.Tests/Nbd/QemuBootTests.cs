using System.Diagnostics;
using System.Text;
using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Nbd;

/// <summary>
/// Stock QEMU (qemu-system-x86_64, TCG, SeaBIOS) boots from a tiered image served by QcowTier over NBD:
/// the firmware reads the boot sector through the export, and the heat map sees it.
/// </summary>
public sealed class QemuBootTests
{
    private const string Banner = "QCOWTIER-BOOT-OK";

    /// <summary>
    /// A boot sector that writes the banner to COM1 and halts: xor ax,ax; mov ds,ax; cld; mov dx,0x3f8;
    /// mov si,msg; next: lodsb; test al,al; jz halt; out dx,al; jmp next; halt: cli; hlt; jmp halt.
    /// </summary>
    private static byte[] BootSector()
    {
        var code = new List<byte> { 0x31, 0xC0, 0x8E, 0xD8, 0xFC, 0xBA, 0xF8, 0x03, 0xBE, 0x00, 0x00 };
        var next = code.Count;
        code.AddRange([0xAC, 0x84, 0xC0, 0x74, 0x03, 0xEE, 0xEB, (byte)(next - (code.Count + 8))]);
        var halt = code.Count;
        code.AddRange([0xFA, 0xF4, 0xEB, (byte)(halt - (code.Count + 4))]);
        var msg = 0x7C00 + code.Count;
        code[9] = (byte)msg;
        code[10] = (byte)(msg >> 8);
        code.AddRange(Encoding.ASCII.GetBytes(Banner + "\r\n\0"));
        var sector = new byte[512];
        code.CopyTo(sector);
        sector[510] = 0x55;
        sector[511] = 0xAA;
        return sector;
    }

    [Fact]
    [Trait("Category", "Heavy")]
    public async Task Qemu_boots_from_a_tiered_image_served_over_nbd_and_the_read_is_recorded()
    {
        File.Exists("/usr/bin/qemu-system-x86_64").Should().BeTrue("qemu-system-x86 is installed by .ci/run (apt-get install qemu-system-x86)");
        using var dir = new TempDir();
        var path = dir.File("boot.qcow2");
        var heat = dir.File("boot.heat");
        using (var img = QcowImage.Create(path, 64L << 20, new QcowCreateOptions { Tier = new QcowTierOptions { DataFile = "boot.hdd", DefaultTier = StorageTier.Hdd } }))
        {
            img.Write(0, BootSector());
            img.Write(1 << 20, new byte[1 << 20]);
            img.MoveToTier(1 << 20, 1 << 20, StorageTier.Ssd);
            img.GetPlacement(0, 512).Should().ContainSingle().Which.Tier.Should().Be(StorageTier.Hdd, "the boot sector is read from the HDD tier");
        }

        await using var served = Served.Start(dir, path, heat: heat);
        var psi = new ProcessStartInfo("/usr/bin/qemu-system-x86_64")
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        foreach (var a in new[]
        {
            "-nodefaults", "-display", "none", "-machine", "pc", "-accel", "tcg", "-m", "32", "-no-reboot",
            "-serial", "stdio", "-boot", "c",
            "-drive", $"file=nbd+unix:///?socket={served.Socket},format=raw,if=ide,index=0,cache=none",
        })
        {
            psi.ArgumentList.Add(a);
        }
        using var qemu = Process.Start(psi)!;
        var output = new StringBuilder();
        var booted = new TaskCompletionSource();
        qemu.OutputDataReceived += (_, e) =>
        {
            lock (output)
            {
                output.AppendLine(e.Data);
                if (e.Data?.Contains(Banner) == true)
                {
                    booted.TrySetResult();
                }
            }
        };
        qemu.ErrorDataReceived += (_, e) =>
        {
            lock (output)
            {
                output.AppendLine(e.Data);
            }
        };
        qemu.BeginOutputReadLine();
        qemu.BeginErrorReadLine();
        var finished = await Task.WhenAny(booted.Task, qemu.WaitForExitAsync(), Task.Delay(TimeSpan.FromSeconds(60)));
        try
        {
            booted.Task.IsCompleted.Should().BeTrue($"QEMU prints the banner of the boot sector it read through NBD; its output:\n{output}");
        }
        finally
        {
            if (!qemu.HasExited)
            {
                qemu.Kill();
            }
            await qemu.WaitForExitAsync();
        }
        await served.CloseAsync();

        var map = HeatMap.Load(heat);
        map.TotalReads.Should().BeGreaterThan(0);
        map.GetUnit(0).Reads.Should().BeGreaterThan(0, "the firmware read the boot sector");
        using var check = QcowImage.Open(path, new QcowOpenOptions { ReadOnly = true });
        check.Check().IsClean.Should().BeTrue();
    }
}
