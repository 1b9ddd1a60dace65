using System.Diagnostics;
using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Rebalance;

/// <summary>kill -9 of `qcowtier rebalance apply` in the middle of its work loses nothing.</summary>
public sealed class RebalanceKillTests : IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    [Fact]
    [Trait("Category", "Heavy")]
    public void Kill_minus_nine_mid_apply_loses_nothing_and_a_rerun_finishes()
    {
        const long size = 64L << 20;
        var img = _dir.File("k.qcow2");
        var heatPath = _dir.File("k.heat");
        var model = new byte[size];
        new Random(4).NextBytes(model);
        using (var image = QcowImage.Create(img, size, new QcowCreateOptions
        {
            ClusterSize = 4096,
            Tier = new QcowTierOptions { DataFile = "k.hdd", DefaultTier = StorageTier.Hdd },
        }))
        {
            image.Write(0, model);
            var heat = new HeatMap(size, image.ClusterSize, imageId: image.HeatIdentity);
            var rnd = new Random(5);
            for (var i = 0; i < 200_000; i++)
            {
                heat.RecordRead(rnd.NextInt64(0, size / 4096) * 4096 / 2, 4096); // the first half is hot
            }
            heat.Save(heatPath);
        }

        var cli = typeof(QcowTier.Cli.Cli).Assembly.Location;
        var psi = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var a in new[] { cli, "rebalance", "apply", img, "--heat", heatPath, "--ssd-budget", "50%", "--throttle", "8M", "-p" })
        {
            psi.ArgumentList.Add(a);
        }
        using (var p = Process.Start(psi)!)
        {
            // Let it get going (it is throttled to 8 MB/s over ~32 MiB), then kill it without warning.
            Thread.Sleep(2500);
            p.HasExited.Should().BeFalse("the apply should still be running when it is killed");
            p.Kill();
            p.WaitForExit(10_000).Should().BeTrue();
        }

        using (var image = QcowImage.Open(img))
        {
            var usage = image.GetTierUsage();
            usage.SsdBytes.Should().BeGreaterThan(0, "some of the plan was applied before the kill");
            var all = new byte[size];
            image.Read(0, all);
            all.AsSpan().SequenceEqual(model).Should().BeTrue("a killed apply loses nothing");
            var check = image.Check(QcowRepairMode.All);
            check.Corruptions.Should().Be(0);
        }

        // Running the same apply again finishes the job; a third plan has nothing left to do.
        var psi2 = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var a in new[] { cli, "rebalance", "apply", img, "--heat", heatPath, "--ssd-budget", "50%" })
        {
            psi2.ArgumentList.Add(a);
        }
        using (var p = Process.Start(psi2)!)
        {
            var err = p.StandardError.ReadToEnd();
            p.WaitForExit(120_000).Should().BeTrue();
            p.ExitCode.Should().Be(0, err);
        }
        using (var image = QcowImage.Open(img))
        {
            image.Check().IsClean.Should().BeTrue();
            var all = new byte[size];
            image.Read(0, all);
            all.AsSpan().SequenceEqual(model).Should().BeTrue();
            var plan = Rebalancer.Plan([new RebalanceInput(image, HeatMap.Load(heatPath, image.HeatIdentity))], new RebalancePolicy { SsdBudgetPercent = 50 });
            plan.Moves.Should().BeEmpty();
        }
    }
}
