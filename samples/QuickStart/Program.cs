// QcowTier quick start. Part 1: create a qcow2 image, write and read through it, check it, look at its
// map. Part 2, the main job: a tiered image (SSD primary file + HDD data file), a skewed workload
// recorded as a heat map, a rebalance plan within an SSD budget, applied crash-safely, placement before
// and after. Runs on temporary files and needs nothing installed; when QEMU's qemu-img is on the PATH
// it also asks QEMU to check the plain image we wrote.
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

    Console.WriteLine();
    Console.WriteLine("--- tiering ---");
    TieringDemo(dir.FullName);
}
finally
{
    dir.Delete(recursive: true);
}

static void TieringDemo(string dir)
{
    // A 256 MiB tiered VM disk: new clusters go to the HDD data file (vm.hdd, next to the image).
    var path = Path.Combine(dir, "vm.qcow2");
    const long size = 256L << 20;
    using var image = QcowImage.Create(path, size, new QcowCreateOptions
    {
        Tier = new QcowTierOptions { DataFile = "vm.hdd", DefaultTier = StorageTier.Hdd },
    });
    var data = new byte[size];
    new Random(1).NextBytes(data);
    image.Write(0, data);
    image.Flush();

    // A day of VM reads, recorded as heat: a skewed (power-law) workload, so a small SSD serves most of it.
    var heat = new HeatMap(image.Size, image.ClusterSize, imageId: image.HeatIdentity);
    image.HeatRecorder = heat;
    var rnd = new Random(2);
    var buf = new byte[4096];
    var clusters = size / image.ClusterSize;
    for (var i = 0; i < 50_000; i++)
    {
        var cluster = (long)(clusters * Math.Pow(rnd.NextDouble(), 6)); // low clusters are hot
        image.Read(cluster * image.ClusterSize, buf);
    }
    image.HeatRecorder = null;
    heat.Save(Path.Combine(dir, "vm.heat"));

    Describe("before", image);
    var plan = Rebalancer.Plan([new RebalanceInput(image, heat)], new RebalancePolicy { SsdBudgetPercent = 10 });
    Console.Write(plan.Explain());
    var result = Rebalancer.Apply(plan, [image]);
    Console.WriteLine($"applied {result.MovesApplied} moves, {result.BytesMoved >> 20} MiB, in {result.Elapsed.TotalMilliseconds:F0} ms");
    Describe("after", image);

    // Nothing the guest reads changed, and both files' metadata is sound.
    var back = new byte[size];
    image.Read(0, back);
    Console.WriteLine($"content unchanged: {back.AsSpan().SequenceEqual(data)}; check: {(image.Check().IsClean ? "clean" : "NOT clean")}");
    using (var png = File.Create(Path.Combine(dir, "vm.png")))
    {
        HeatRender.WriteHeatStrip(png, heat, image);
    }

    static void Describe(string when, QcowImage image)
    {
        var usage = image.GetTierUsage();
        Console.WriteLine($"{when}: SSD {usage.SsdBytes >> 20} MiB, HDD {usage.HddBytes >> 20} MiB");
    }
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
