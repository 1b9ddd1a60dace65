// QcowTier quick start: create a qcow2 image, write and read through it, check it, look at its map.
// Runs on temporary files and needs nothing installed; when QEMU's qemu-img is on the PATH it also
// asks QEMU to check the image we wrote.
using System.Diagnostics;
using System.Text;
using QcowTier;

var dir = Directory.CreateTempSubdirectory("qcowtier-quickstart-");
try
{
    var path = Path.Combine(dir.FullName, "disk.qcow2");

    // 1. Create a 1 GiB image: QEMU's defaults (qcow2 v3, 64 KiB clusters, 16-bit refcounts).
    using (var image = QcowImage.Create(path, 1L << 30))
    {
        // 2. Write a little data at scattered, unaligned offsets; the image allocates clusters as needed.
        var hello = Encoding.UTF8.GetBytes("Hello from QcowTier!");
        image.Write(0, hello);
        image.Write(123_456_789, hello);
        await image.WriteAsync(700L << 20, new byte[1 << 20].Select((_, i) => (byte)i).ToArray());

        // 3. Zero a range (zero flag, no data written) and discard another.
        image.WriteZeroes(700L << 20, 256 << 10);
        image.Discard(123_456_789 & ~0xffffL, 64 << 10);

        // 4. Flush: everything written so far is now durable, in crash-safe order.
        image.Flush();
    }

    using (var image = QcowImage.Open(path, new QcowOpenOptions { ReadOnly = true }))
    {
        var buf = new byte[20];
        image.Read(0, buf);
        Console.WriteLine($"read back at 0:        \"{Encoding.UTF8.GetString(buf)}\"");
        image.Read(123_456_789, buf);
        Console.WriteLine($"read back at 123456789: {(buf.All(b => b == 0) ? "zeroes (discarded)" : Encoding.UTF8.GetString(buf))}");

        var info = image.GetInfo();
        Console.WriteLine($"virtual size {info.VirtualSize} bytes, cluster size {info.ClusterSize}, compat {info.Compat}, refcount bits {info.RefcountBits}");

        Console.WriteLine("map:");
        foreach (var e in image.GetMap())
        {
            if (e.Kind != QcowExtentKind.Unallocated)
            {
                Console.WriteLine($"  guest [{e.Start,12}, +{e.Length,9})  {e.Kind,-11} host {e.HostOffset?.ToString() ?? "-"}");
            }
        }

        var check = image.Check();
        Console.WriteLine($"check: {(check.IsClean ? "No errors were found on the image." : $"{check.Corruptions} corruptions, {check.Leaks} leaks")}");
    }

    if (TryRun("qemu-img", $"check \"{path}\"", out var qemuOut))
    {
        Console.WriteLine("qemu-img check says:");
        Console.Write(qemuOut);
    }
    else
    {
        Console.WriteLine("(qemu-img not found: skipping QEMU's own check)");
    }
}
finally
{
    dir.Delete(recursive: true);
}

static bool TryRun(string tool, string args, out string output)
{
    output = "";
    try
    {
        using var p = Process.Start(new ProcessStartInfo(tool, args) { RedirectStandardOutput = true, RedirectStandardError = true });
        if (p is null)
        {
            return false;
        }
        output = p.StandardOutput.ReadToEnd() + p.StandardError.ReadToEnd();
        p.WaitForExit();
        return true;
    }
    catch (System.ComponentModel.Win32Exception)
    {
        return false;
    }
}
